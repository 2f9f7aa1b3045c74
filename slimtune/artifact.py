"""Artifacts: a model, its tokenizer, its task, and where it came from.

On disk an artifact is a Hugging Face directory plus ``slimtune.json``::

    config.json, model.safetensors, tokenizer files   (HF layout)
    slimtune.json   format version, task, lineage, module swaps, compression,
                    and ``files``: the size and sha256 of every other file
    metrics.json    what was measured after the stage (a stage directory always
                    has one; ``Artifact.save`` writes the artifact's ``metrics``,
                    ``{}`` when it holds none; older artifacts may lack it)

Every read (``load``, ``slimtune info``/``eval``, the runner before it
reuses a stage) first checks each file against ``files`` (size and full
sha256; a hash costs ~0.8 s per 538 MB here and is computed once per file
and process, so hard-linked stages cost nothing extra) and raises
:class:`ArtifactError` naming the damaged file. Artifacts written before
``files`` existed are checked against the weights' sha256 in the lineage.

Loading rebuilds the exact module structure: a skeleton from ``config.json``,
then every swap recorded in ``slimtune.json`` (``{"module": name, "type":
registered class, "config": {...}}``) replaces a submodule, then the
safetensors state dict is loaded strictly. Nothing is unpickled. Artifacts
without swaps also load with plain ``transformers.AutoModel*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from slimtune.errors import ArtifactError
from slimtune.models import first_line
from slimtune.recipe import TaskConfig

FORMAT_VERSION = 1
META_FILE = "slimtune.json"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Artifact:
    """What flows from stage to stage.

    Attributes:
        model: the ``nn.Module`` (a transformers model, possibly with swapped
            submodules), in eval mode after load.
        tokenizer: its tokenizer.
        task: the task the model serves (data, columns, kind).
        labels: class names for classification, else None.
        lineage: one entry per stage applied: ``{"stage", "config", "key", "sha256"}``.
        swaps: module swaps to replay on a skeleton at load time.
        compression: free-form compression metadata stages record.
        module_attrs: ``{module path: {attribute: value}}`` set on the skeleton
            at load time, for surgery the config cannot express (e.g. the head
            count of a BERT attention whose heads were removed); when present,
            linear layers take the shapes stored in the weight file.
        attachments: ``{key: record}`` of parts attached on top of the backbone
            without changing it (``"deltas"``), saved and reloaded by the
            :class:`slimtune.registry.Attachment` registered for ``key``.
        path: the directory it was loaded from or saved to, if any.
        metrics: what was measured of this model after its last stage
            (``metrics.json``): ``load`` reads them and ``save`` writes them
            back, so a loaded artifact saves with the same layout as its stage
            directory. They describe the weights as loaded: code that changes
            the model outside a stage should clear them (the runner writes each
            stage's own metrics.json and does not use this field).
    """

    model: nn.Module
    tokenizer: Any
    task: TaskConfig
    labels: list | None = None
    lineage: list[dict] = field(default_factory=list)
    swaps: list[dict] = field(default_factory=list)
    compression: dict = field(default_factory=dict)
    module_attrs: dict = field(default_factory=dict)
    path: Path | None = None
    metrics: dict = field(default_factory=dict)
    attachments: dict = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        """The cache key of the last stage applied (None for a bare model)."""
        return self.lineage[-1].get("key") if self.lineage else None

    def meta(self) -> dict:
        with bare(self.model):  # ties are replayed on the backbone before its attachments come back
            ties = shared_parameters(self.model)
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task.model_dump(mode="json"),
            "labels": self.labels,
            "lineage": self.lineage,
            "swaps": self.swaps,
            "compression": self.compression,
            "module_attrs": self.module_attrs,
            "ties": ties,
            **({"attachments": self.attachments} if self.attachments else {}),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the artifact to ``directory`` atomically (temp dir, then rename), laid out as a stage directory.

        ``metrics.json`` holds :attr:`metrics` (``{}`` when nothing was measured).
        """
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.write_into(tmp)
        write_json(tmp / METRICS_FILE, self.metrics)
        replace_dir(tmp, directory)
        self.path = directory
        return directory

    def write_into(self, directory: Path) -> None:
        """Write the files into an existing (temporary) directory."""
        from slimtune.registry import ATTACHMENTS, ensure_loaded

        directory.mkdir(parents=True, exist_ok=True)
        if self.attachments:
            ensure_loaded()
        present = attached(self.model)
        with bare(self.model):
            self._write_backbone(directory, set().union(*(ATTACHMENTS[k].bound_to(self.attachments.get(k)) for k in present)))
        sha = file_sha256(directory / WEIGHTS_FILE)
        self.attachments = {k: ATTACHMENTS[k].save(self.model, self.attachments.get(k), directory, sha) for k in present}
        self.tokenizer.save_pretrained(directory)
        self.write_meta(directory)

    def _write_backbone(self, directory: Path, bound: set) -> None:
        """Config and weights of the (bare) model; the weight file is a hard link to the loaded one when
        every attachment is bound to exactly that file (so a delta stage never copies its backbone)."""
        source = self.path / WEIGHTS_FILE if self.path is not None else None
        if len(bound) == 1 and source is not None and source.is_file() and file_sha256(source) in bound:
            try:
                os.link(source, directory / WEIGHTS_FILE)
            except OSError:
                shutil.copy2(source, directory / WEIGHTS_FILE)
            self.model.config.save_pretrained(directory)
            if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
                self.model.generation_config.save_pretrained(directory)
        elif shared_parameters(self.model):
            save_deduplicated(self.model, directory)
        else:
            self.model.save_pretrained(directory, safe_serialization=True)

    def write_meta(self, directory: Path) -> None:
        """``slimtune.json`` for the files already in ``directory`` (the manifest covers them all)."""
        files = file_manifest(directory)
        if self.lineage and WEIGHTS_FILE in files:
            self.lineage[-1]["sha256"] = files[WEIGHTS_FILE]["sha256"]
        write_json(directory / META_FILE, {**self.meta(), "files": files})


def attached(model: nn.Module) -> list[str]:
    """The keys of the attachments (deltas, ...) ``model`` carries."""
    from slimtune.registry import ATTACHMENTS

    return [k for k, a in ATTACHMENTS.items() if a.present(model)]


@contextmanager
def bare(model: nn.Module):
    """``model`` without its attachments (the backbone alone) for the duration of the block."""
    from slimtune.registry import ATTACHMENTS

    with ExitStack() as stack:
        for key in attached(model):
            stack.enter_context(ATTACHMENTS[key].stripped(model))
        yield model


def shared_parameters(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every parameter or persistent buffer that is
    another's tensor (e.g. a quantized LM head sharing the quantized embedding's
    packed buffers), unless transformers ties them itself (tied word embeddings)."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    known = set(getattr(model, "all_tied_weights_keys", None) or {})
    return ties if set(ties) - known else {}


def save_deduplicated(model: nn.Module, directory: Path) -> None:
    """Config and weights with each shared tensor stored once (``save_pretrained`` refuses shared tensors it does not know)."""
    from safetensors.torch import save_file

    ties = shared_parameters(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in ties}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


def _apply_module_attrs(model: nn.Module, attrs: dict, state: dict) -> None:
    """Replay recorded attribute edits; give linear layers the stored shapes."""
    for path, values in attrs.items():
        module = model.get_submodule(path)
        for attr, value in values.items():
            setattr(module, attr, value)
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and weight is not None and weight.shape != module.weight.shape:
            module.out_features, module.in_features = weight.shape
            module.weight = nn.Parameter(torch.empty_like(weight, dtype=module.weight.dtype))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(weight.shape[0], dtype=module.bias.dtype))


def _apply_ties(model: nn.Module, ties: dict[str, str]) -> None:
    """Make each tied parameter or buffer the very same object as its source again."""
    for name, source in ties.items():
        parent, _, attr = name.rpartition(".")
        source_parent, _, source_attr = source.rpartition(".")
        setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(source_parent), source_attr))


def load(directory: str | Path) -> Artifact:
    """Load any artifact directory, ready to run (eval mode, swaps rebuilt).

    Raises:
        ArtifactError: the directory is missing, not an artifact, damaged
            (a file missing, truncated or altered) or of a newer format.
    """
    import transformers

    from slimtune.registry import MODULE_TYPES, ensure_loaded
    from slimtune.tasks import task_kind

    directory = Path(directory)
    meta = read_meta(directory)
    verify(directory, meta)
    task = TaskConfig.model_validate(meta["task"])
    with _unreadable(directory):
        config = transformers.AutoConfig.from_pretrained(directory)
        state = load_file(directory / WEIGHTS_FILE)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    auto = getattr(transformers, task_kind(task.kind).auto_class)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = auto.from_config(config, dtype=dtype)
    if meta.get("swaps"):
        ensure_loaded()
    for swap in meta.get("swaps", []):
        if swap["type"] not in MODULE_TYPES:
            raise ArtifactError(f"{directory}: module type {swap['type']!r} is not registered", "install the SlimTune version that wrote this artifact")
        parent, _, child = swap["module"].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, MODULE_TYPES[swap["type"]].from_config(swap["config"]))
    if meta.get("module_attrs"):
        _apply_module_attrs(model, meta["module_attrs"], state)
    if meta.get("ties"):
        _apply_ties(model, meta["ties"])
    _load_state(model, state, directory / WEIGHTS_FILE)
    attachments = meta.get("attachments") or {}
    if attachments:
        _attach(model, attachments, directory, meta)
    model.eval()
    return Artifact(
        model=model, tokenizer=tokenizer, task=task, labels=meta.get("labels"), lineage=meta.get("lineage", []),
        swaps=meta.get("swaps", []), compression=meta.get("compression", {}), module_attrs=meta.get("module_attrs", {}), path=directory,
        metrics=read_metrics(directory), attachments=attachments,
    )


def _attach(model: nn.Module, attachments: dict, directory: Path, meta: dict) -> None:
    """Put back what the artifact records on top of its backbone (deltas), from the files beside it."""
    from slimtune.registry import ATTACHMENTS, ensure_loaded

    ensure_loaded()
    sha = ((meta.get("files") or {}).get(WEIGHTS_FILE) or {}).get("sha256") or file_sha256(directory / WEIGHTS_FILE)
    for key, recorded in attachments.items():
        if key not in ATTACHMENTS:
            raise ArtifactError(f"{directory}: attachment {key!r} is not known to this SlimTune", "install the SlimTune version that wrote this artifact")
        ATTACHMENTS[key].load(model, recorded, directory, sha)


@contextmanager
def _unreadable(directory: Path):
    """Turn a file transformers or safetensors cannot read into an ArtifactError (artifacts older than the manifest)."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{directory} is damaged: {first_line(err)}", REPAIR) from None


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ArtifactError(
            f"{path} does not match the model structure (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "the artifact is corrupt or was written by another version; re-run the stage",
        )


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names (parameters and buffers) that share storage with an earlier one."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.state_dict(keep_vars=True).items():
        if p.data_ptr() in first:
            tied.add(name)
        else:
            first[p.data_ptr()] = name
    return tied


REPAIR = "re-run the recipe that wrote it (a damaged stage is recomputed) or restore the directory from a copy"
NOT_AN_ARTIFACT = "pass a stage directory such as runs/<name>/01-finetune"


def read_meta(directory: Path) -> dict:
    """The parsed ``slimtune.json`` of an artifact directory, its shape checked.

    Raises:
        ArtifactError: no such directory, not an artifact, a corrupt
            ``slimtune.json``, or a newer format version.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {str(directory)!r} does not exist", NOT_AN_ARTIFACT)
    if not meta_path.is_file():
        raise ArtifactError(f"{str(directory)!r} is not a SlimTune artifact (no {META_FILE})", NOT_AN_ARTIFACT)
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{meta_path} is corrupt: {first_line(err)}", REPAIR) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or not isinstance(meta.get("task"), dict):
        raise ArtifactError(f"{meta_path} is corrupt: it has no integer format_version and task", REPAIR)
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{directory} uses artifact format {version}, newer than {FORMAT_VERSION}", "upgrade SlimTune")
    try:
        TaskConfig.model_validate(meta["task"])
    except ValidationError as err:
        raise ArtifactError(f"{meta_path} is corrupt: its task does not validate ({first_line(err)})", REPAIR) from None
    if not isinstance(meta.get("files", {}), dict) or not isinstance(meta.get("lineage", []), list):
        raise ArtifactError(f"{meta_path} is corrupt: files must be a mapping and lineage a list", REPAIR)
    return meta


def verify(directory: Path, meta: dict | None = None) -> None:
    """Check every file an artifact recorded (size, then sha256) and ``metrics.json``.

    Raises:
        ArtifactError: naming the first damaged file and how it differs.
    """
    directory = Path(directory)
    meta = read_meta(directory) if meta is None else meta
    problem = damage(directory, meta)
    if problem:
        raise ArtifactError(f"{directory} is damaged: {problem}", REPAIR)


def damage(directory: Path, meta: dict) -> str | None:
    """What is wrong with the files of an artifact, or None when they are intact."""
    files = meta.get("files")
    if not files:  # written before the manifest: the lineage holds the weights' hash
        sha = (meta.get("lineage") or [{}])[-1].get("sha256")
        files = {WEIGHTS_FILE: {"sha256": sha} if sha else {}}
    for name, recorded in sorted(files.items()):
        problem = _file_damage(directory / name, recorded if isinstance(recorded, dict) else {})
        if problem:
            return f"{name} {problem}"
    try:
        read_metrics(directory)
    except ArtifactError:
        return f"{METRICS_FILE} is not a readable JSON object (corrupt)"
    return None


def _file_damage(path: Path, recorded: dict) -> str | None:
    if not path.is_file():
        return "is missing" + (" (a dangling link)" if path.is_symlink() else "")
    size = path.stat().st_size
    if "size" in recorded and size != recorded["size"]:
        return f"has {size} bytes but {META_FILE} records {recorded['size']} (truncated or altered)"
    if "sha256" in recorded and file_sha256(path) != recorded["sha256"]:
        return f"does not match the sha256 {META_FILE} records for it (altered)"
    return None


def read_metrics(directory: Path) -> dict:
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:
        raise ArtifactError(f"{path} is corrupt: {first_line(err)}", REPAIR) from None
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path} is corrupt: not a JSON object", REPAIR)
    return metrics


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


_SHA256: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, computed once per file version and process (hard links share one)."""
    st = os.stat(path)
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if version not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256[version] = digest.hexdigest()
    return _SHA256[version]


def file_manifest(directory: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file below ``directory`` but the metadata."""
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in (META_FILE, METRICS_FILE):
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temporary directory into place, replacing ``dst``."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def disk_size_bytes(directory: Path, names: tuple[str, ...] = (WEIGHTS_FILE,)) -> int:
    """Bytes of the weight files of an artifact."""
    return sum((Path(directory) / n).stat().st_size for n in names if (Path(directory) / n).is_file())
