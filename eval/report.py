"""Tables of what each stage measured: on the terminal (rich) and in report.md.

The ``parameters`` column and ``slimtune info`` use one definition,
:func:`slimtune.models.parameter_count`: the model's distinct weights, each
tied or shared tensor counted once, a packed quantized weight counted as the
number of weights it stands for (its scales and zero points are not counted;
the bytes they take are in ``size MB``).
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from slimtune.artifact import META_FILE, read_meta
from slimtune.errors import ArtifactError

PARAMETERS_DEFINITION = "distinct weights: tied and shared once, packed quantized weights as the weights they stand for"
COLUMNS = ("stage", "metric", "value", "parameters", "size MB", "PyTorch ms", "ONNX RT ms", "notes")


def stage_row(name: str, reused: bool, m: dict, compression: dict | None = None) -> list[str]:
    """One table row from a stage's metrics.json (and its artifact's compression record, for the quantization scheme)."""
    metric, value = _headline(m)
    notes = compression_notes(m, compression or {})
    if "max_abs_diff" in m:
        notes.append(f"onnx {m.get('onnx_mb', 0):.1f} MB, max abs diff {m['max_abs_diff']:.1e}, agree {m['prediction_agreement']:.4f}")
    if "best_epoch" in m:
        notes.append(f"best epoch {m['best_epoch']}, {m.get('steps')} steps")
    if "seconds" in m:
        notes.append(f"{m['seconds']:.0f} s" + (" (reused)" if reused else ""))
    return [
        name, metric, value,
        format_count(m["parameters"]) if "parameters" in m else "",
        f"{m['size_mb']:.1f}" if "size_mb" in m else "",
        f"{m['torch_ms']:.2f}" if "torch_ms" in m else "",
        f"{m['onnx_ms']:.2f}" if "onnx_ms" in m else "",
        "; ".join(notes),
    ]


def compression_notes(m: dict, compression: dict) -> list[str]:
    """What a quantize, share or prune stage did, from the metrics it returned."""
    notes = []
    if "quantized_modules" in m:
        schemes = _scheme_summary(compression.get("quantize"))
        notes.append(f"{m['quantized_modules']} modules quantized" + (f" ({schemes})" if schemes else "")
                     + f", weights {_mb(m['weight_mb_before'])} -> {_mb(m['weight_mb'])} MB")
    if "unique_parameters_before" in m:
        groups = m.get("groups")
        notes.append((f"{len(groups)} shared group{'s' * (len(groups) != 1)}, " if isinstance(groups, list) else "")
                     + f"unique parameters {format_count(m['unique_parameters_before'])} -> {format_count(m['unique_parameters_after'])}")
    if "sparsity" in m:
        prune = compression.get("prune") or {}
        how = ", ".join(str(x) for x in (prune.get("method"), prune.get("pattern")) if x)
        notes.append(f"measured sparsity {m['sparsity']:.4f}" + (f" ({how})" if how else ""))
    if "parameters_before" in m and "parameters" in m:
        notes.append(f"parameters {format_count(m['parameters_before'])} -> {format_count(m['parameters'])}"
                     + (f", blocks {format_count(m['block_parameters_before'])} -> {format_count(m['block_parameters_after'])}"
                        if "block_parameters_after" in m else ""))
    return notes


def _scheme_summary(record: dict | None) -> str:
    """``4-bit g32, 8-bit per-channel``: the distinct weight schemes of a quantization record."""
    if not isinstance(record, dict) or not isinstance(record.get("modules"), dict):
        return ""
    schemes = []
    for m in record["modules"].values():
        scheme = f"{m.get('bits')}-bit " + ("per-channel" if m.get("group_size") is None else f"g{m['group_size']}")
        if scheme not in schemes:
            schemes.append(scheme)
    return ", ".join(schemes + ([f"embedding {record['embedding']}"] if record.get("embedding") else []))


def format_count(n: int) -> str:
    """A parameter count: exact below a million (``14,866``), else in millions (``22.71M``)."""
    return f"{n:,}" if n < 1_000_000 else f"{n / 1e6:.2f}M"


def _mb(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def _headline(m: dict) -> tuple[str, str]:
    split = m.get("split", "")
    for key in ("accuracy", "perplexity", "centroid_accuracy"):
        if key in m:
            return f"{key} ({split})" if split else key, f"{m[key]:.4f}"
    if "accuracy_onnx" in m:
        return "accuracy (onnx, test)", f"{m['accuracy_onnx']:.4f}"
    return "", ""


def stage_table(title: str, rows: list[tuple[str, Path, bool, dict]]) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col not in ("stage", "metric", "notes") else "left")
    for name, path, reused, metrics in rows:
        table.add_row(*stage_row(f"{path.name}" if path else name, reused, metrics, _compression(path)))
    return table


def markdown_table(rows: list[tuple[str, Path, bool, dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, path, reused, metrics in rows:
        lines.append("| " + " | ".join(stage_row(path.name if path else name, reused, metrics, _compression(path))) + " |")
    return "\n".join(lines) + "\n"


def _compression(path: Path | None) -> dict:
    """The compression record of the artifact at ``path`` ({} when there is none to read)."""
    if path is None or not (Path(path) / META_FILE).is_file():
        return {}
    try:
        return read_meta(path).get("compression") or {}
    except ArtifactError:
        return {}


def write_summary(result) -> Path:
    """``runs/<name>/report.md``: the stage table of the last run."""
    rows = [(r.name, r.path, r.reused, r.metrics) for r in result.stages]
    path = result.run_dir / "report.md"
    path.write_text(f"# {result.recipe.name}\n\n{result.recipe.description}\n\n" + markdown_table(rows))
    return path


def info_text(path: Path, meta: dict, metrics: dict, parameters: int | None = None) -> Table:
    """``slimtune info``: an artifact's task, lineage, files, compression and metrics.

    Args:
        parameters: :func:`slimtune.models.parameter_count` of the loaded model
            (the number ``slimtune eval`` reports); None leaves the row out.
    """
    table = Table(title=f"artifact {path}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    task = meta.get("task", {})
    table.add_row("format version", str(meta.get("format_version")))
    table.add_row("task", f"{task.get('kind')} on {task.get('data')} (max_length {task.get('max_length')})")
    if meta.get("labels") is not None:
        table.add_row("labels", ", ".join(map(str, meta["labels"])))
    for i, entry in enumerate(meta.get("lineage", [])):
        detail = entry.get("model") or ", ".join(f"{k}={v}" for k, v in (entry.get("config") or {}).items())
        table.add_row(f"lineage {i}", escape(f"{entry['stage']}: {detail}  [key {entry.get('key')}, sha256 {str(entry.get('sha256'))[:12]}]"))
    weights = path / "model.safetensors"
    if weights.is_file():
        table.add_row("weights", f"{weights.stat().st_size / 1e6:.1f} MB (model.safetensors)")
    if (path / "model.onnx").is_file():
        table.add_row("onnx", f"{(path / 'model.onnx').stat().st_size / 1e6:.1f} MB (model.onnx)")
    table.add_row("module swaps", str(len(meta.get("swaps", []))))
    compression = meta.get("compression") or {}
    shown = {k: ({n: x for n, x in v.items() if n != "modules"} if isinstance(v, dict) else v) for k, v in compression.items()}
    table.add_row("compression", escape(str(shown or "none")))
    if isinstance(compression.get("prune"), dict) and "modules" in compression["prune"]:
        table.add_row("sparsity", escape(sparsity_lines(compression["prune"])))
    if isinstance(compression.get("quantize"), dict) and "modules" in compression["quantize"]:
        table.add_row("quantization", escape(quantization_lines(compression["quantize"])))
    for record in (meta.get("attachments") or {}).get("deltas") or []:
        table.add_row(f"delta {record.get('name')}", escape(delta_line(path, record)))
    if parameters is not None:
        table.add_row("parameters", f"{parameters:,} ({PARAMETERS_DEFINITION})")
    for key, value in metrics.items():
        if key != "history":
            table.add_row(f"metric {key}", f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    return table


def delta_line(path: Path, record: dict) -> str:
    """One delta of an artifact: method, modules adapted, file size, the backbone it is bound to."""
    file = path / record.get("file", "")
    size = f"{file.stat().st_size / 1e6:.2f} MB" if file.is_file() else "file missing"
    modules = record.get("modules") or []
    config = next((m["config"] for m in modules if m.get("config")), {})
    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    state = "" if record.get("active", True) else ", inactive"
    return (f"{record.get('method')} on {len(modules)} modules ({settings}){state}; {record.get('file')} {size}; "
            f"bound to backbone sha256 {str(record.get('backbone_sha256'))[:12]}")


def sparsity_lines(prune: dict, most: int = 24) -> str:
    """Measured sparsity per pruned module and overall; beyond ``most`` modules, grouped across layers."""
    modules = prune["modules"]
    lines = [f"overall {prune['overall']:.4f} ({prune['method']}, target {prune['target']:.4g}"
             + (f", pattern {prune['pattern']})" if prune.get("pattern") else f", scope {prune.get('scope')})")]
    if prune.get("changed"):  # a later stage (e.g. share: {init: mean}) changed the pruned weights
        lines.append(f"a later stage changed it: {prune['changed'].split(': ', 1)[-1]}")
    if len(modules) <= most:
        return "\n".join(lines + [f"{name}  {value:.4f}" for name, value in modules.items()])
    groups: dict[str, list[float]] = {}
    for name, value in modules.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name, count=1), []).append(value)
    lines += [f"{name}  {min(v):.4f}" + (f"..{max(v):.4f}" if max(v) != min(v) else "") + f"  ({len(v)} modules)"
              for name, v in groups.items()]
    return "\n".join(lines + ["(every module's value: slimtune.json)"])


def quantization_lines(record: dict) -> str:
    """Quantized modules counted by scheme (bits, group size, symmetry, method), plus the embedding."""
    counts: dict[str, int] = {}
    for m in record["modules"].values():
        group = "per-channel" if m.get("group_size") is None else f"group {m['group_size']}"
        key = f"{m['bits']}-bit {group} {'symmetric' if m.get('symmetric', True) else 'asymmetric'} ({m.get('method', record['method'])})"
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{key}: {n} module{'s' * (n != 1)}" for key, n in counts.items()]
    if record.get("activations"):
        lines.append(f"activations: dynamic per-token INT{record['activations']}")
    if record.get("embedding"):
        lines.append(f"embedding: {record['embedding']} (row-wise)")
    return "\n".join(lines + ["(every module: slimtune.json)"])

