#!/usr/bin/env bash
# Issue 5 benchmarks (BENCHMARKS.md, "Compression II"): SmolLM2 perplexity / size / CPU latency for each weight
# quantization, and MiniLM INT8 / INT4 g64 PTQ against INT4 QAT on Rotten Tomatoes.
# Usage: bash benchmarks/quant.sh [OUT]   (default OUT=runs/bench; expects $OUT/minilm-distill from compress.sh
# for the MiniLM teacher, else trains it first)
set -euo pipefail
OUT=${1:-runs/bench}
SLIMTUNE=${SLIMTUNE:-.venv/bin/slimtune}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# SmolLM2 (dense baseline: the smollm2-wanda recipe at sparsity 0, as in compress.sh).
[ -d "$OUT/smollm2-dense/02-evaluate" ] || \
  $SLIMTUNE run smollm2-wanda --out "$OUT/smollm2-dense" --set stages.prune.method=magnitude --set stages.prune.sparsity=0
q=stages.quantize
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-int8" --set $q.method=rtn --set $q.bits=8 --set $q.group_size=channel
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-w8a8" --set $q.method=rtn --set $q.bits=8 --set $q.group_size=channel --set $q.activations=8
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-int4-rtn" --set $q.method=rtn
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-int4-gptq"
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-int4-awq" --set $q.method=awq
$SLIMTUNE run smollm2-int4-gptq --out "$OUT/smollm2-int4-g32-rtn" --set $q.method=rtn --set $q.group_size=32

# MiniLM: one teacher, three quantizations.
for name in int8 int4-g64 int4-g64-qat; do
  mkdir -p "$OUT/minilm-$name"
  if [ -d "$OUT/minilm-distill/01-finetune" ]; then
    cp -rn "$OUT/minilm-distill/01-finetune" "$OUT/minilm-distill/02-evaluate" "$OUT/minilm-$name/"
  fi
done
$SLIMTUNE run benchmarks/minilm-quant.yaml --out "$OUT/minilm-int8"
cp -rn "$OUT/minilm-int8/01-finetune" "$OUT/minilm-int8/02-evaluate" "$OUT/minilm-int4-g64/"
cp -rn "$OUT/minilm-int8/01-finetune" "$OUT/minilm-int8/02-evaluate" "$OUT/minilm-int4-g64-qat/"
$SLIMTUNE run benchmarks/minilm-quant.yaml --out "$OUT/minilm-int4-g64" --set $q.bits=4 --set $q.group_size=64
$SLIMTUNE run benchmarks/minilm-quant.yaml --out "$OUT/minilm-int4-g64-qat" --set $q.bits=4 --set $q.group_size=64 \
  --set $q.qat.epochs=1 --set $q.qat.distill=true
