#!/usr/bin/env bash
# The device-machine checks of issues 3 and 5 in one call (prepare with benchmarks/gpu/prepare.sh first):
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=600)
# 1. python -m slimtune.compress.kernels.bench --quick (INT4 g128 / INT8 on 4096x4096) -> $OUT/kernels-quick.md
# 2. pytest -m gpu tests/compress                                                    -> $OUT/gpu-tests.log
# 3. SmolLM2 training step throughput, single vs DDP vs FSDP on the GPUs there         -> $OUT/distributed.log
# 4. the full kernel table, M up to 2048 (for GEMV_MAX_M / CUBLAS_MIN_M), in the time left -> $OUT/kernels.md
# Each part has its own time limit (the whole stays under TOTAL seconds, default 560), so one that hangs or
# fails still leaves the others' results; rows are written as they come.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# What the image lacks (.gpu/whl) into /tmp/site, and slimtune itself as a tree of links that mirrors
# pyproject's package-dir (slimtune.compress = ./compress, ...), so the image's packages stay untouched.
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
rm -rf /tmp/shim && mkdir -p /tmp/shim/slimtune && cp -rs "$PWD/slimtune/." /tmp/shim/slimtune/
for d in compress delta prompt distributed eval; do ln -s "$PWD/$d" "/tmp/shim/slimtune/$d"; done
export PYTHONPATH=/tmp/shim:/tmp/site:${PYTHONPATH:-}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

part() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name" 2>&1; echo "   exit $? after $((SECONDS - start)) s"; tail -4 "$OUT/$name"; }

part kernels-quick.md "${QUICK_LIMIT:-100}" $PY -m slimtune.compress.kernels.bench --quick --markdown
part gpu-tests.log "${TEST_LIMIT:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/compress
$PY - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2"))
model.save_pretrained("/tmp/smollm2-random")
AutoTokenizer.from_pretrained(".gpu/smollm2").save_pretrained("/tmp/smollm2-random")
PY
part distributed.log "${DIST_LIMIT:-150}" $PY -m slimtune.distributed.bench benchmarks/gpu/smollm2-train.yaml \
  --nproc "$NGPU" --strategies single,ddp,fsdp --out /tmp/bench-distributed
left=$(( ${TOTAL:-560} - SECONDS ))
[ "$left" -gt 30 ] && part kernels.md "$left" $PY -m slimtune.compress.kernels.bench --markdown \
  --m 1 2 4 8 16 32 64 128 256 512 1024 2048
echo "total $SECONDS s"
