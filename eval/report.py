"""Tables of what each stage measured: on the terminal (rich) and in report.md."""

from __future__ import annotations

import re
from pathlib import Path

from rich.markup import escape
from rich.table import Table

COLUMNS = ("stage", "metric", "value", "parameters", "size MB", "PyTorch ms", "ONNX RT ms", "notes")


def stage_row(name: str, reused: bool, m: dict) -> list[str]:
    """One table row from a stage's metrics.json."""
    metric, value = _headline(m)
    notes = []
    if "max_abs_diff" in m:
        notes.append(f"onnx {m.get('onnx_mb', 0):.1f} MB, max abs diff {m['max_abs_diff']:.1e}, agree {m['prediction_agreement']:.4f}")
    if "best_epoch" in m:
        notes.append(f"best epoch {m['best_epoch']}, {m.get('steps')} steps")
    if "seconds" in m:
        notes.append(f"{m['seconds']:.0f} s" + (" (reused)" if reused else ""))
    return [
        name, metric, value,
        f"{m['parameters'] / 1e6:.2f}M" if "parameters" in m else "",
        f"{m['size_mb']:.1f}" if "size_mb" in m else "",
        f"{m['torch_ms']:.2f}" if "torch_ms" in m else "",
        f"{m['onnx_ms']:.2f}" if "onnx_ms" in m else "",
        "; ".join(notes),
    ]


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
        table.add_row(*stage_row(f"{path.name}" if path else name, reused, metrics))
    return table


def markdown_table(rows: list[tuple[str, Path, bool, dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, path, reused, metrics in rows:
        lines.append("| " + " | ".join(stage_row(path.name if path else name, reused, metrics)) + " |")
    return "\n".join(lines) + "\n"


def write_summary(result) -> Path:
    """``runs/<name>/report.md``: the stage table of the last run."""
    rows = [(r.name, r.path, r.reused, r.metrics) for r in result.stages]
    path = result.run_dir / "report.md"
    path.write_text(f"# {result.recipe.name}\n\n{result.recipe.description}\n\n" + markdown_table(rows))
    return path


def info_text(path: Path, meta: dict, metrics: dict) -> Table:
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
    params = _parameters_from_header(weights)
    if params:
        table.add_row("parameters", f"{params:,} (stored tensors)")
    for key, value in metrics.items():
        if key != "history":
            table.add_row(f"metric {key}", f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    return table


def sparsity_lines(prune: dict, most: int = 24) -> str:
    """Measured sparsity per pruned module and overall; beyond ``most`` modules, grouped across layers."""
    modules = prune["modules"]
    lines = [f"overall {prune['overall']:.4f} ({prune['method']}, target {prune['target']:.4g}"
             + (f", pattern {prune['pattern']})" if prune.get("pattern") else f", scope {prune.get('scope')})")]
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


def _parameters_from_header(weights: Path) -> int:
    """Element count of the stored tensors, read from the safetensors header only."""
    if not weights.is_file():
        return 0
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total
