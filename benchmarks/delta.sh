#!/usr/bin/env bash
# Issue 14 benchmark (BENCHMARKS.md, "Delta tuning on MiniLM"): embedded MiniLM on Rotten Tomatoes with the data,
# batches and single epoch of minilm-sentiment's full fine-tune, against LoRA, DoRA, LoRA on query/value,
# Houlsby and parallel adapters, BitFit, prefix-tuning and ladder side-tuning, and PEFT's LoRA as the peer
# (benchmarks/peft_minilm.py: same model load, split, batches and Trainer). Prints one table at the end.
# Usage: bash benchmarks/delta.sh [OUT]   (default OUT=runs/delta; about 40 minutes alone on 2 cores)
# Set ONLY="lora full ..." to run a subset.
set -euo pipefail
OUT=${1:-runs/delta}
SLIMTUNE=${SLIMTUNE:-.venv/bin/slimtune}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT/recipes"

variant() {  # name lr "stage yaml"
  local name=$1 lr=$2 stage=$3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  cat > "$OUT/recipes/$name.yaml" <<YAML
name: minilm-delta-$name
description: issue 14 delta benchmark ($name)
model: embedded:minilm
task: {kind: classification, data: embedded:rotten-tomatoes, text: text, label: label, max_length: 64, limit: {train: 6000}}
train: {batch_size: 16, lr: $lr, group_by_length: true, precision: fp32, seed: 0}
distributed: {strategy: single, nproc: 1}
stages:
  - $stage
  - evaluate: {split: test, onnx: false, latency: false}
YAML
  $SLIMTUNE run "$OUT/recipes/$name.yaml" --out "$OUT/$name" --quiet
}

variant full 5.0e-5 "finetune: {epochs: 1}"
variant lora 2.0e-3 "lora: {rank: 4, alpha: 8, targets: [all-linear]}"
variant dora 2.0e-3 "lora: {rank: 4, alpha: 8, targets: [all-linear], dora: true}"
variant lora-qv 2.0e-3 "lora: {rank: 8, alpha: 16, targets: [query, value]}"
variant houlsby 1.0e-3 "adapter: {kind: houlsby}"
variant parallel 1.0e-3 "adapter: {kind: parallel}"
variant bitfit 5.0e-3 "bitfit: {}"
variant prefix 5.0e-3 "prefix: {num_virtual_tokens: 20}"
variant ladder 3.0e-3 "ladder: {reduction: 8}"
if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" peft "* ]]; then
  $PY benchmarks/peft_minilm.py --rank 4 --alpha 8 --lr 2e-3 > "$OUT/peft.json"
fi

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for run in sorted(p for p in out.iterdir() if p.is_dir() and (p / "02-evaluate").is_dir()):
    train = json.loads(next(run.glob("01-*/metrics.json")).read_text())
    test = json.loads((run / "02-evaluate" / "metrics.json").read_text())
    delta = sum(f.stat().st_size for f in next(run.glob("01-*")).glob("deltas/*.safetensors"))
    rows[run.name] = dict(acc=test["accuracy"], trainable=train.get("trainable_percent", 100.0), delta_mb=delta / 1e6,
                          rss=max(train.get("peak_rss_mb") or [0]), step=train.get("step_seconds"), wall=train.get("seconds"))
if (out / "peft.json").is_file():
    p = json.loads((out / "peft.json").read_text())
    rows[f"peft {p['peft']}"] = dict(acc=p["test_accuracy"], trainable=p["trainable_percent"], delta_mb=None,
                                     rss=p["peak_rss_mb"], step=p["step_seconds"], wall=p["train_seconds"])
full = rows.get("full")
print("| variant | test accuracy | vs full | trainable % | delta file MB | peak RSS MB | s/step | stage s | vs full wall |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    vs = f"{100 * r['acc'] / full['acc']:.1f}%" if full else ""
    wall = f"{r['wall'] / full['wall']:.2f}x" if full and r["wall"] else ""
    mb = "" if r["delta_mb"] is None else f"{r['delta_mb']:.3f}"
    print(f"| {name} | {r['acc']:.4f} | {vs} | {r['trainable']:.3f} | {mb} | {r['rss']:.0f} | {r['step']:.3f} | {r['wall']:.0f} | {wall} |")
PY
