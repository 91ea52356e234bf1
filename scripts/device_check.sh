#!/usr/bin/env bash
# GPU check of the suite, run from the repository root on a CUDA machine whose Python already
# has torch, timm, pandas, scikit-image and matplotlib. Wheels of the remaining pure-Python
# dependencies (hydra-core, omegaconf, antlr4-python3-runtime, pycocotools) are taken from
# .whl/ when present. Writes its log and key results to $OUT (default: device_out/).
#   1. the ABPC benchmark (reference procedure vs batched engine) at the default chunk size,
#      at chunks of 64, and with TF32 and autocast
#   2. the quickstart with faithfulness=abpc and sweep=grid on CUDA
#   3. the explainer benchmark at batch 64
set -u
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

step() { echo "=== $1 ($(date +%T))"; }
for chunk in "" "--batch-size 64"; do
  step "ABPC benchmark, 128 images, strict fp32 ${chunk:-default chunk}"
  timeout 150 python3 scripts/benchmark_abpc.py --device cuda --images 128 $chunk
done
step "ABPC benchmark, 128 images, TF32 and autocast"
timeout 150 python3 scripts/benchmark_abpc.py --device cuda --images 128 --allow-tf32 --amp
step "quickstart on cuda with abpc and sweep"
SECONDS=0
timeout 100 python3 -m wsol_bench device=cuda faithfulness=abpc sweep=grid progress=false num_workers=8 \
  store.root=/tmp/store hydra.run.dir=/tmp/quick
echo "quickstart wall ${SECONDS}s"
cp /tmp/quick/table_box.csv "$OUT/quick_table_box.csv"; cp /tmp/quick/wsoleval.csv "$OUT/quick_wsoleval.csv"
step "explainer benchmark, batch 64"
timeout 60 python3 scripts/benchmark_explainers.py --device cuda --batch-size 64
step done
