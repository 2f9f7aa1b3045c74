#!/usr/bin/env bash
# Issue 4 benchmarks (BENCHMARKS.md, "Compression I"): MiniLM distill / structured prune / share against one
# fine-tuned teacher, and SmolLM2 50% unstructured and 2:4 pruning by magnitude and by Wanda.
# Usage: bash benchmarks/compress.sh [OUT]   (default OUT=runs/bench; about 45 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/bench}
SLIMTUNE=${SLIMTUNE:-.venv/bin/slimtune}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# The three MiniLM recipes start with the same finetune and evaluate stages (same stage keys), so the
# teacher is trained once and its stage directories are copied: the runner reuses finished stages by key.
$SLIMTUNE run benchmarks/minilm-distill.yaml --out "$OUT/minilm-distill"
for name in prune share; do
  mkdir -p "$OUT/minilm-$name"
  cp -r "$OUT/minilm-distill/01-finetune" "$OUT/minilm-distill/02-evaluate" "$OUT/minilm-$name/"
  $SLIMTUNE run "benchmarks/minilm-$name.yaml" --out "$OUT/minilm-$name"
done

# SmolLM2: dense, then magnitude and Wanda at 50% unstructured and 2:4.
$SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-dense" --set stages.prune.method=magnitude --set stages.prune.sparsity=0
$SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-magnitude" --set stages.prune.method=magnitude
$SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-wanda"
$SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-magnitude-2of4" --set stages.prune.method=magnitude --set stages.prune.pattern=2:4
$SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-wanda-2of4" --set stages.prune.pattern=2:4
