"""Saving and loading deltas: alone, inside an artifact, bound to their backbone.

A saved delta is a directory entry ``deltas/<name>.safetensors`` (the delta's
own tensors, keyed by their qualified names in the model) plus a record in
``slimtune.json``'s ``attachments.deltas`` list::

    {"name": "default", "method": "lora", "file": "deltas/default.safetensors",
     "backbone_sha256": "<sha256 of the backbone's model.safetensors>",
     "modules": [{"module": "bert.encoder.layer.0.attention.self.query", "type": "LoraLinear",
                  "config": {"rank": 8, ...}}, ...],
     "active": true, "stage": {...the stage's resolved config, when a stage made it}}

Inside an artifact the backbone's weight file sits beside it (a hard link to
the backbone stage's own file) and ``slimtune.load`` attaches every delta
(:class:`DeltaAttachment`). :func:`save_delta` writes a delta alone (the
record as ``delta.json``); :func:`load_delta_` attaches a saved delta (alone,
or out of an artifact) to a model, refusing one bound to another backbone
unless told otherwise.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.artifact import META_FILE, WEIGHTS_FILE, Artifact, file_sha256, read_meta, replace_dir, verify, write_json
from slimtune.errors import ArtifactError, SlimTuneError
from slimtune.registry import MODULE_TYPES, Attachment, register_attachment
from slimtune.delta.inject import DeltaLayer, canonical, deltas, detached, resolve, wrap_

DELTA_DIR = "deltas"
DELTA_META = "delta.json"


def _ordered_names(model: nn.Module) -> list[str]:
    """Delta names, the earliest attached first (inner wrappers before the ones around them)."""
    first: dict[str, int] = {}
    for _, m in deltas(model):
        first[m.delta_name] = min(first.get(m.delta_name, m.order), m.order)
    return sorted(first, key=first.get)


def delta_records(model: nn.Module, backbone_sha256: str | None, info: dict | None = None) -> list[dict]:
    """The records of every delta attached to ``model`` (see the module docstring)."""
    records = []
    for name in _ordered_names(model):
        found = sorted(deltas(model, name), key=lambda nm: nm[1].order)
        merged = [n for n, m in found if m.merged]
        if merged:
            raise SlimTuneError(f"delta {name!r} is merged into the weights at {merged[0]}: its backbone cannot be saved apart",
                                "unmerge_ it before saving, or merge_and_unload_ to save a plain merged model")
        methods = sorted({m.method for _, m in found if m.method != "trained-copy"}) or ["trained-copy"]
        records.append({"name": name, "method": "+".join(methods), "file": f"{DELTA_DIR}/{name}.safetensors",
                        "backbone_sha256": backbone_sha256, "active": all(m.active for _, m in found),
                        "modules": [{"module": canonical(n), "type": type(m).__name__, "config": m.config()} for n, m in found],
                        **({"stage": info[name]} if info and name in info else {})})
    return records


def _delta_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    state = {}
    for qualified, wrapper in deltas(model, name):  # keyed by backbone paths: the same whatever wraps around later
        for pname, p in wrapper.delta_parameters():
            state[f"{canonical(qualified)}.{pname}"] = p.detach().contiguous()
    return state


def write_delta_files(model: nn.Module, directory: Path, records: list[dict]) -> None:
    (directory / DELTA_DIR).mkdir(parents=True, exist_ok=True)
    for record in records:
        save_file(_delta_state(model, record["name"]), str(directory / record["file"]), metadata={"format": "pt"})


def attach_records_(model: nn.Module, records: list[dict], directory: Path, backbone_sha256: str | None,
                    allow_other_backbone: bool = False, where: str = "") -> list[str]:
    """Rebuild the wrappers ``records`` describe on ``model`` and load their tensors from ``directory``.

    Raises:
        ArtifactError: a record bound to another backbone (unless ``allow_other_backbone``),
            an unknown module type, or files that do not match the record.
    """
    where = where or str(directory)
    names = []
    for record in records:
        bound = record.get("backbone_sha256")
        if not allow_other_backbone and bound and backbone_sha256 and bound != backbone_sha256:
            raise ArtifactError(
                f"{where}: delta {record['name']!r} was trained on backbone sha256 {bound[:12]}..., "
                f"not on this one ({backbone_sha256[:12]}...)",
                "attach it to the artifact it was trained on, or pass allow_other_backbone=True to force it")
        attached = {m.delta_name for _, m in deltas(model)}
        if record["name"] in attached:
            raise SlimTuneError(f"a delta named {record['name']!r} is already attached", "detach_ it first, or load under another name")
        for module in record["modules"]:
            cls = MODULE_TYPES.get(module["type"])
            if cls is None or not issubclass(cls, DeltaLayer):
                raise ArtifactError(f"{where}: delta module type {module['type']!r} is not known", "install the SlimTune version that wrote it")
            try:
                slot = resolve(model, module["module"])
            except AttributeError:
                raise ArtifactError(f"{where}: delta {record['name']!r} adapts {module['module']}, which this model does not have",
                                    "attach the delta to the model it was trained on") from None
            wrap_(model, slot, lambda m, cls=cls, module=module: cls.from_config(m, module["config"], record["name"]))
        state = load_file(directory / record["file"])
        expected = _delta_state(model, record["name"])
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or bad_shape:
            raise ArtifactError(f"{where}: {record['file']} does not match delta {record['name']!r} "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]})",
                                "the delta files are damaged or from another version; re-run the stage that wrote them")
        with torch.no_grad():
            for qualified, wrapper in deltas(model, record["name"]):
                for pname, p in wrapper.delta_parameters():
                    p.copy_(state[f"{canonical(qualified)}.{pname}"])
                wrapper.active = bool(record.get("active", True))
        names.append(record["name"])
    return names


class DeltaAttachment(Attachment):
    """``attachments.deltas`` of an artifact: the deltas on top of its unchanged backbone."""

    def present(self, model) -> bool:
        return any(isinstance(m, DeltaLayer) for m in model.modules())

    def bound_to(self, recorded) -> set[str]:
        return {r["backbone_sha256"] for r in recorded or [] if isinstance(r, dict) and r.get("backbone_sha256")}

    def stripped(self, model):
        return detached(model)

    def save(self, model, info, directory, backbone_sha256):
        stage_info = {r["name"]: r["stage"] for r in info or [] if isinstance(r, dict) and "stage" in r}
        records = delta_records(model, backbone_sha256, stage_info)
        write_delta_files(model, Path(directory), records)
        from slimtune.delta.peft import write_peft_copy  # a float LoRA also in PEFT's format, in peft/

        write_peft_copy(model, Path(directory))
        return records

    def load(self, model, recorded, directory, backbone_sha256):
        attach_records_(model, recorded, Path(directory), backbone_sha256)


register_attachment("deltas", DeltaAttachment())


def backbone_sha256(artifact: Artifact) -> str | None:
    """The sha256 of the weight file of the artifact's backbone (None for a model never saved)."""
    if artifact.path is not None and (artifact.path / WEIGHTS_FILE).is_file():
        return file_sha256(artifact.path / WEIGHTS_FILE)
    return (artifact.lineage[-1].get("sha256") if artifact.lineage else None)


def save_delta(model: nn.Module | Artifact, directory: str | Path, backbone: str | None = None) -> Path:
    """Write the deltas attached to ``model`` alone (no backbone weights) into ``directory``.

    Args:
        model: a model with deltas, or an artifact (its backbone hash is recorded).
        backbone: the sha256 of the backbone weight file to bind the delta to
            (default: the artifact's; None for a plain model).
    """
    if isinstance(model, Artifact):
        backbone = backbone or backbone_sha256(model)
        model = model.model
    records = delta_records(model, backbone)
    if not records:
        raise SlimTuneError("the model has no delta attached", "attach one first (add_lora_, add_adapters_, ...)")
    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent if directory.parent.exists() else None))
    try:
        write_delta_files(model, tmp, records)
        write_json(tmp / DELTA_META, {"format_version": 1, "deltas": records})
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_delta_(model: nn.Module | Artifact, directory: str | Path, allow_other_backbone: bool = False) -> list[str]:
    """Attach the deltas saved in ``directory`` (by :func:`save_delta`, or a delta stage's artifact) to ``model``.

    When ``model`` is an artifact, each delta's recorded backbone hash must equal
    the artifact's own weight file's (``allow_other_backbone=True`` skips the check).

    Returns:
        The names of the attached deltas.

    Raises:
        ArtifactError: not a delta directory, damaged, or bound to another backbone.
    """
    directory = Path(directory)
    sha = None
    if isinstance(model, Artifact):
        sha = backbone_sha256(model)
        model = model.model
    if (directory / DELTA_META).is_file():
        try:
            records = json.loads((directory / DELTA_META).read_text())["deltas"]
        except (ValueError, KeyError, OSError) as err:
            raise ArtifactError(f"{directory / DELTA_META} is corrupt: {err}", "save the delta again") from None
    elif (directory / META_FILE).is_file():
        meta = read_meta(directory)
        verify(directory, meta)
        records = (meta.get("attachments") or {}).get("deltas")
        if not records:
            raise ArtifactError(f"{directory} holds no delta", "pass the directory of a delta stage or one written by save_delta")
    else:
        raise ArtifactError(f"{directory} is not a saved delta (no {DELTA_META} or {META_FILE})",
                            "pass the directory of a delta stage or one written by save_delta")
    return attach_records_(model, records, directory, sha, allow_other_backbone)
