#!/usr/bin/env bash
# Issue 14 benchmark (BENCHMARKS.md, "Quantize, then LoRA-tune"): embedded SmolLM2-135M, held-out IMDB perplexity of
# LoRA on the fp32 weights (benchmarks/smollm2-lora.yaml) against LoRA over the INT4 GPTQ g128 weights
# (smollm2-qlora as shipped), QA-LoRA over them unmerged and merged into INT4, and LoRA merged by
# re-quantization. The INT4 variants share one GPTQ stage (copied: the runner reuses finished stages by key).
# Usage: bash benchmarks/qlora.sh [OUT]   (default OUT=runs/qlora; about an hour alone on 2 cores)
set -euo pipefail
OUT=${1:-runs/qlora}
SLIMTUNE=${SLIMTUNE:-.venv/bin/slimtune}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
l=stages.lora

$SLIMTUNE run smollm2-qlora --out "$OUT/int4-lora" --quiet
for v in qalora qalora-merged lora-merged; do
  mkdir -p "$OUT/int4-$v"
  [ -d "$OUT/int4-$v/01-quantize" ] || cp -r "$OUT/int4-lora/01-quantize" "$OUT/int4-$v/"
done
$SLIMTUNE run smollm2-qlora --out "$OUT/int4-qalora" --quiet --set $l.quant_aware=true
$SLIMTUNE run smollm2-qlora --out "$OUT/int4-qalora-merged" --quiet --set $l.quant_aware=true --set $l.merge=true
$SLIMTUNE run smollm2-qlora --out "$OUT/int4-lora-merged" --quiet --set $l.merge=true
$SLIMTUNE run benchmarks/smollm2-lora.yaml --out "$OUT/fp32-lora" --quiet

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| variant | perplexity | train loss (first -> last epoch) | merge | s/step | lora stage s |")
print("|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    lora = json.loads(next(run.glob("*-lora/metrics.json")).read_text())
    test = json.loads(next(run.glob("*-evaluate/metrics.json")).read_text())
    merge = lora.get("merge") or {}
    merged = (f"exact ({merge.get('merged_exactly')} layers)" if merge.get("merged_exactly") else
              f"re-quantized, rel. error {merge['requant_rel_error_mean']:.4f}" if merge.get("requant_rel_error_mean") else "")
    print(f"| {run.name} | {test['perplexity']:.2f} | {lora.get('train_loss', float('nan')):.4f} | {merged} | "
          f"{lora.get('step_seconds') or 0:.1f} | {lora.get('seconds')} |")
PY
