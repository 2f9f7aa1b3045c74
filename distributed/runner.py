"""Run a recipe: one artifact directory per stage, finished stages reused.

Stage ``i`` of recipe ``name`` lives in ``runs/<name>/<i:02d>-<stage>/``. Its
key is a hash of its resolved config and its input's key (the first input's
key hashes the model, task and training defaults). A stage is written to a
hidden temporary directory and renamed when complete, so a killed run never
leaves a half-written stage; a re-run reuses every stage whose key is
unchanged and recomputes the rest. ``fresh=True`` ignores finished stages.

Under torchrun every rank runs the loop: training stages on all ranks (they
must agree on the resulting model, which is checked), measuring/exporting
stages on rank 0 only; rank 0 alone writes, the others read its output.
Training checkpoints live in ``<run>/.checkpoints/`` until their stage is
finished, so a restarted (or re-run) job resumes mid-stage.

A run directory belongs to the recipe *name* in its ``recipe.yaml``. Before
anything is written (and before torchrun is launched) :func:`check_out_dir`
refuses a directory another recipe owns, naming it and its finished stages;
with ``fresh=True`` that run is replaced on purpose: its stage directories and
report are deleted before the first stage runs, so the directory never mixes
two recipes' stages. A directory with finished stages but no readable
``recipe.yaml`` (the runner writes it before any stage, so only a hand-deleted
or copied one lacks it) has an unknown owner and is treated the same way.
Re-running the same name, even edited, resumes as above. A non-empty directory
that is not a run, and a path in or under an artifact directory (one holding
``slimtune.json``) or at a stage's place in another run, are always refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from transformers import AutoConfig

from slimtune.artifact import META_FILE, METRICS_FILE, Artifact, file_sha256, load, read_meta, read_metrics, replace_dir, verify, write_json
from slimtune.data import load_task_data
from slimtune.models import load_pretrained, resolve_model_dir
from slimtune.distributed import launch
from slimtune.distributed.strategy import SingleDevice, build_strategy
from slimtune.distributed.trainer import seed_everything
from slimtune.errors import ArtifactError, RecipeError, RunFailed, SlimTuneError
from slimtune.progress import quiet
from slimtune.recipe import Recipe, content_key, load_recipe
from slimtune.registry import get_stage
from slimtune.stage import StageContext, device_of, reconcile
from slimtune.tasks import task_kind

log = logging.getLogger(__name__)
STAGE_DIR = re.compile(r"^(\d{2})-([\w.-]+)$")
CHECKPOINTS = ".checkpoints"  # training checkpoints of unfinished stages; survives a killed run
RECIPE_FILE = "recipe.yaml"
RECIPE_TMP = ".recipe.yaml.tmp"
REPORT_FILE = "report.md"  # written into the run directory by `slimtune run` (eval.report)


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
        fresh: bool = False, node_rank: int = 0, rdzv_endpoint: str | None = None) -> RunResult:
    """Run (or resume) ``recipe``.

    Args:
        recipe: a shipped recipe name, a YAML path, or a validated Recipe.
        overrides: ``{"train.lr": 3e-5, ...}`` applied before validation.
        out: the run directory (default ``runs/<recipe name>``).
        fresh: recompute every stage even if a finished one matches, and
            replace a run of another recipe that occupies ``out``.
        node_rank, rdzv_endpoint: this machine's rank and machine 0's
            ``HOST:PORT`` when ``distributed.nnodes`` > 1.

    With ``distributed.nproc * nnodes > 1`` the stages run under torchrun
    (see :mod:`slimtune.distributed.launch`) and this call waits for it.

    Raises:
        SlimTuneError: bad recipe, model, data or launch, or an ``out`` that
            another recipe's run (or anything but a run) occupies, see
            :func:`check_out_dir`; nothing is written then.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    # Check everything the user can get wrong before writing anything.
    run_dir = Path(out) if out else Path("runs") / recipe.name
    check_out_dir(run_dir, recipe, fresh)  # torchrun ranks pass: their launcher wrote this recipe's name there
    resolve_model_dir(recipe.model)
    data = load_task_data(recipe.task)
    device = device_of(recipe.train)
    check_runtime(recipe, device)
    config = recipe.distributed
    created = not run_dir.exists() and not launch.in_torchrun()
    try:
        if config.world_size > 1 and not launch.in_torchrun():
            launch.check_launch(config.nproc, config.nnodes, device, node_rank, rdzv_endpoint)
            _prepare_run_dir(run_dir, recipe, fresh)
            args = ["run", str(run_dir / "recipe.yaml"), "--out", str(run_dir)] + ["--fresh"] * fresh + ["--quiet"] * quiet()
            launch.launch(args, config.nproc, config.nnodes, node_rank, rdzv_endpoint, config.max_restarts, run_id=recipe.name)
            return _collect(recipe, run_dir)
        return _execute(recipe, data.labels, run_dir, fresh, device)
    except SlimTuneError:
        # Bad input found inside the first stage (a LoRA rank a layer cannot take, ...): a run directory
        # this call created and no stage finished in is removed, so nothing is left half-written.
        if created and run_dir.is_dir() and not _stage_dirs(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_runtime(recipe: Recipe, device: torch.device) -> None:
    """Refuse a device, precision or split this machine and model cannot run."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is cuda but no CUDA GPU is available here", "set train.device: cpu (or auto)")
    if device.type == "cuda" and recipe.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"train.precision bf16 is not supported by {torch.cuda.get_device_name(device)}", "use precision fp16 or fp32")
    config = recipe.distributed
    if config.strategy == "pipeline":
        layers = getattr(AutoConfig.from_pretrained(resolve_model_dir(recipe.model)), "num_hidden_layers", None)
        if layers is not None and config.world_size > layers:
            raise RecipeError(f"distributed.strategy pipeline with {config.world_size} stages, but {recipe.model} has only {layers} layers",
                              f"use at most {layers} processes (nproc * nnodes) for a pipeline")


def _execute(recipe: Recipe, labels: list | None, run_dir: Path, fresh: bool, device: torch.device) -> RunResult:
    """Run the stages in this process (one rank of a torchrun job, or alone)."""
    distributed = launch.in_torchrun() and launch.env_world_size() > 1
    if distributed and recipe.distributed.strategy == "single":
        raise RecipeError(f"started on {launch.env_world_size()} processes but distributed.strategy is single",
                          "set distributed.strategy to ddp, fsdp or pipeline")
    fresh = fresh and launch.restart_count() == 0  # a restarted rank resumes instead
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    if distributed:
        device = launch.worker_device(device)
    with launch.process_group(device, join=distributed):
        strategy = build_strategy(recipe.distributed, device, recipe.train.precision) if distributed else SingleDevice(device)
        if strategy.is_main:
            _prepare_run_dir(run_dir, recipe, fresh)
        launch.barrier()
        return _stages(recipe, labels, run_dir, fresh, strategy, distributed)


def _stages(recipe: Recipe, labels, run_dir: Path, fresh: bool, strategy, distributed: bool) -> RunResult:
    key, artifact, records = recipe.root_key(), None, []
    prev_path: Path | None = None
    redo = fresh  # once a stage is recomputed, every later stage is too: its input changed
    for i, spec in enumerate(recipe.stages, start=1):
        key = content_key([key, spec.name, spec.resolved()])
        path = run_dir / f"{i:02d}-{spec.name}"
        if not redo and launch.decided_by_main(strategy.is_main and _finished(path, key, labels)):
            log.info("stage %02d %s: reusing %s", i, spec.name, path)
            records.append(StageRecord(i, spec.name, path, key, True, read_metrics(path)))
            artifact, prev_path = None, path
            continue
        redo = True
        stage = get_stage(spec.name)()
        if getattr(stage, "main_process_only", False) and not strategy.is_main:
            launch.barrier()  # rank 0 runs it
            records.append(StageRecord(i, spec.name, path, key, False, read_metrics(path)))
            artifact, prev_path = None, path
            continue
        if artifact is None:
            artifact = load(prev_path) if prev_path else _source_artifact(recipe, labels)
        log.info("stage %02d %s: running", i, spec.name)
        checkpoints = run_dir / CHECKPOINTS / f"{i:02d}-{spec.name}-{key[:12]}"
        artifact, metrics = _run_stage(recipe, spec, stage, artifact, path, key, strategy, checkpoints)
        if distributed:
            if not getattr(stage, "main_process_only", False):
                _check_agreement(artifact, spec.name)
            launch.barrier()  # rank 0 has written the stage
            if not strategy.is_main:
                artifact = None  # later stages read rank 0's copy
        if strategy.is_main:
            shutil.rmtree(checkpoints, ignore_errors=True)
        records.append(StageRecord(i, spec.name, path, key, False, metrics))
        prev_path = path
    if strategy.is_main:
        _remove_stale(run_dir, {r.path.name for r in records})
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # every stage is finished
    return RunResult(recipe, run_dir, records)


def _collect(recipe: Recipe, run_dir: Path) -> RunResult:
    """The records of a run another process group finished."""
    key, records = recipe.root_key(), []
    for i, spec in enumerate(recipe.stages, start=1):
        key = content_key([key, spec.name, spec.resolved()])
        path = run_dir / f"{i:02d}-{spec.name}"
        reason = _unfinished(path, key)
        if reason is not None:
            raise RunFailed(f"stage {i:02d} {spec.name} did not finish" + (f": {reason}" if reason else ""), "re-run to resume")
        records.append(StageRecord(i, spec.name, path, key, False, read_metrics(path)))
    return RunResult(recipe, run_dir, records)


def _check_agreement(artifact: Artifact, stage: str) -> None:
    """Every rank must hold the same model after a collective stage."""
    digest = hashlib.sha256()
    for name, tensor in sorted(artifact.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"stage {stage}: the ranks ended with different models ({digests})")


def check_out_dir(run_dir: Path, recipe: Recipe, fresh: bool) -> None:
    """Refuse a run directory that is not ``recipe``'s to write (see the module docstring).

    Raises:
        SlimTuneError: ``run_dir`` is a file; is or lies in an artifact
            directory or at a stage's place in another run; is a non-empty
            directory that is no run; or holds another recipe's run, or
            finished stages of an unknown one, and ``fresh`` is false.
    """
    _check_placement(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise SlimTuneError(f"--out {run_dir} is a file, not a directory", "choose a new or empty directory for --out")
    owner = _owner(run_dir)
    if owner == recipe.name:
        return  # this recipe's run: resume it
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != RECIPE_TMP and not _is_temporary(p.name))
    if not entries:
        return
    stages = _stage_dirs(run_dir)
    foreign = [name for name in entries if not _run_content(name)]
    if not stages and (owner is None or foreign):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise SlimTuneError(f"--out {run_dir} is a non-empty directory that is not a SlimTune run directory (it holds {shown})",
                            f"choose a new or empty directory for --out (the default is runs/{recipe.name}); "
                            "--fresh replaces only run directories")
    if fresh:
        return  # replaced by _prepare_run_dir
    finished = ", ".join(stages) if stages else "none"
    whose = f"the run of recipe {owner!r}" if owner else "a run whose recipe.yaml is missing or names no recipe"
    raise SlimTuneError(f"--out {run_dir} holds {whose} (finished stages: {finished}); running recipe {recipe.name!r} there "
                        "would delete them",
                        f"choose another --out (the default is runs/{recipe.name}), or add --fresh to replace that run on purpose "
                        "(its stages are deleted)")


def _check_placement(run_dir: Path) -> None:
    """Refuse a run written into an artifact, or where another run's stage or checkpoints go."""
    path = run_dir.resolve()
    for parent in (path, *path.parents):
        if os.path.isfile(parent / META_FILE):
            where = "is an artifact directory" if parent == path else f"lies inside the artifact directory {parent}"
            raise SlimTuneError(f"--out {run_dir} {where} (it holds {META_FILE}); "
                                "a run there would write into the artifact",
                                "choose an --out outside every artifact and stage directory, e.g. runs/<name>")
    for parent in path.parents:
        child = path.relative_to(parent).parts[0]
        owner = _owner(parent) if STAGE_DIR.match(child) or child == CHECKPOINTS or _is_temporary(child) else None
        if owner is not None:
            where = "is" if parent / child == path else f"lies in {parent / child}, which is"
            raise SlimTuneError(f"--out {run_dir} {where} where the run directory {parent} (recipe {owner!r}) keeps a stage "
                                "or its checkpoints; re-running that recipe would replace or delete it",
                                f"choose an --out outside {parent}, or a sub-directory of it not named like a stage (NN-name)")


def _owner(run_dir: Path) -> str | None:
    """The recipe name in ``run_dir/recipe.yaml``; None if it is missing, unreadable or names none."""
    if not os.path.isfile(run_dir / RECIPE_FILE):
        return None
    try:
        raw = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) and name else None


def _stage_dirs(run_dir: Path) -> list[str]:
    """Names of the stage directories in ``run_dir`` that hold an artifact, in order."""
    return sorted(p.name for p in run_dir.iterdir() if STAGE_DIR.match(p.name) and os.path.isfile(p / META_FILE))


def _run_content(name: str) -> bool:
    """Whether a run writes an entry of this name into its directory."""
    return name in (RECIPE_FILE, RECIPE_TMP, REPORT_FILE, CHECKPOINTS) or bool(STAGE_DIR.match(name)) or _is_temporary(name)


def _is_temporary(name: str) -> bool:
    """A hidden ``.NN-stage.tmp-PID`` or ``.NN-stage.old-PID`` directory of a (killed) run."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def _prepare_run_dir(run_dir: Path, recipe: Recipe, fresh: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(run_dir)
    if fresh:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        if _owner(run_dir) != recipe.name:  # check_out_dir allowed replacing another recipe's run
            _remove_stale(run_dir, set())
            (run_dir / REPORT_FILE).unlink(missing_ok=True)
    _write_recipe(run_dir, recipe)


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


def _run_stage(recipe: Recipe, spec, stage, artifact: Artifact, path: Path, key: str, strategy, checkpoints: Path) -> tuple[Artifact, dict]:
    """Run one stage; rank 0 writes it to a temporary directory and renames it when complete."""
    main = strategy.is_main
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}") if main else Path(tempfile.mkdtemp(prefix="slimtune-rank-"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    input_path = artifact.path
    started = time.perf_counter()
    try:
        ctx = StageContext(artifact=artifact, train=recipe.train, out_dir=tmp, recipe=recipe, strategy=strategy, checkpoint_dir=checkpoints)
        result = stage.run(ctx, spec.config)
        out = result.artifact
        for note in reconcile(out, f"stage {path.name}"):  # records this stage invalidated: recomputed or dropped
            log.warning("warning: %s", note)
        out.lineage = out.lineage + [{"stage": spec.name, "config": spec.resolved(), "key": key}]
        # world_size: the processes the job really ran on (checked by compare_strategies).
        metrics = {**result.metrics, "world_size": strategy.world_size, "seconds": round(time.perf_counter() - started, 2)}
        if not main:
            return out, metrics
        if stage.changes_model or input_path is None:
            out.write_into(tmp)
        else:
            _link_weights(input_path, tmp)
            out.write_meta(tmp)  # the manifest covers the linked files too
        write_json(tmp / METRICS_FILE, metrics)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not main:
            shutil.rmtree(tmp, ignore_errors=True)
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


def _finished(path: Path, key: str, labels: Any = ...) -> bool:
    """A finished stage with this key, made for these labels (``...``: any), whose files are intact.

    A damaged stage (a file missing, truncated or altered, see
    :func:`slimtune.artifact.verify`) or one made for other labels is not
    finished: it is recomputed, with a warning saying why.
    """
    reason = _unfinished(path, key, labels)
    if reason:
        log.warning("warning: %s; recomputing stage %s and every stage after it", reason, path.name)
    return reason is None


def _unfinished(path: Path, key: str, labels: Any = ...) -> str | None:
    """Why ``path`` is not a finished stage (see :func:`_finished`); None if it is.

    The reason is ``""`` when the stage is simply absent or made with another
    key (nothing to warn about), else it says what is damaged or different.
    """
    if not (path / META_FILE).is_file():
        return ""
    try:
        meta = read_meta(path)
        lineage = meta.get("lineage", [])
        if not lineage or lineage[-1].get("key") != key:
            return ""
        verify(path, meta)
    except ArtifactError as err:
        return err.message
    if labels is ... or meta.get("labels") == labels:
        return None
    return f"{path} was made for labels {meta.get('labels')}, the data now has {labels}"


def _write_recipe(run_dir: Path, recipe: Recipe) -> None:
    tmp = run_dir / RECIPE_TMP
    tmp.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    os.replace(tmp, run_dir / RECIPE_FILE)


def _remove_temporaries(run_dir: Path) -> None:
    """Leftovers of a killed run: hidden ``.NN-stage.tmp-PID`` directories."""
    for item in run_dir.iterdir():
        if _is_temporary(item.name):
            shutil.rmtree(item, ignore_errors=True)


def _remove_stale(run_dir: Path, current: set[str]) -> None:
    """Stage directories (those holding an artifact) that the edited recipe no longer has."""
    for name in _stage_dirs(run_dir):
        if name not in current:
            shutil.rmtree(run_dir / name)
