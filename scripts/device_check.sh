#!/usr/bin/env bash
# GPU check of the suite, run from the repository root on a CUDA machine whose Python already
# has torch, timm, pandas, scikit-image and matplotlib. Wheels of the remaining dependencies
# (hydra-core, omegaconf, antlr4-python3-runtime, pycocotools, torchmetrics, lightning-utilities,
# opencv-python-headless, tabulate) are taken from .whl/ when present
# (pip download -d .whl --only-binary=:all: --python-version 3.X ... on a machine with the
# registry). Writes its log and key results to $OUT (default: device_out/).
#   0. the paper table benchmark (issue: scale): ViT-B/16, the four paper methods, ABPC and the
#      100-threshold sweep on 512 images, strict fp32 and the fast mode, projected to ImageNet val
#   1. the ABPC benchmark (reference procedure vs batched engine) at the default chunk size,
#      strict fp32 and with TF32 and autocast
#   2. the quickstart with faithfulness=abpc and sweep=grid on CUDA
#   3. the explainer benchmark at batch 64
#   4. the faithfulness measures of issue 30 (batched engine vs the published procedure image by
#      image, same numbers checked): Chefer's perturbation test, SaCo, ROAD (needs grad-cam's
#      wheel in .whl/ for its reference; its solver path on CUDA is untested elsewhere)
#   5. the measure group against Quantus (issue 31; needs the quantus wheel and its
#      dependencies, scikit-learn and cachetools, in .whl/): images/s of each side, per-image
#      agreement
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
step "paper table benchmark, ViT-B/16, 512 images"
timeout 300 python3 scripts/benchmark_paper_table.py --device cuda --images 512 --batch-size 64 --out /tmp/paper_table
cp /tmp/paper_table/run0/run.json "$OUT/paper_table_strict_run.json" 2>/dev/null
cp /tmp/paper_table/run1/run.json "$OUT/paper_table_fast_run.json" 2>/dev/null
step "ABPC benchmark, 128 images, strict fp32, default chunk"
timeout 120 python3 scripts/benchmark_abpc.py --device cuda --images 128
step "ABPC benchmark, 128 images, TF32 and autocast"
timeout 120 python3 scripts/benchmark_abpc.py --device cuda --images 128 --allow-tf32 --amp
step "quickstart on cuda with abpc and sweep"
SECONDS=0
timeout 100 python3 -m wsol_bench device=cuda faithfulness=abpc sweep=grid progress=false num_workers=8 \
  store.root=/tmp/store hydra.run.dir=/tmp/quick
echo "quickstart wall ${SECONDS}s"
cp /tmp/quick/table_box.csv "$OUT/quick_table_box.csv"; cp /tmp/quick/wsoleval.csv "$OUT/quick_wsoleval.csv"
step "explainer benchmark, batch 64"
timeout 60 python3 scripts/benchmark_explainers.py --device cuda --batch-size 64
step "Chefer perturbation benchmark, 128 images"
timeout 120 python3 scripts/benchmark_chefer_perturbation.py 128 --rounds 1 --block 32 --device cuda
step "SaCo benchmark, 128 images"
timeout 120 python3 scripts/benchmark_saco.py 128 --rounds 1 --block 32 --device cuda
step "ROAD benchmark, 64 images (16 through the library)"
timeout 150 python3 scripts/benchmark_road.py --images 64 --reference-images 16 --rounds 1 --device cuda
step "measure group against Quantus, 64 images (map-only) and 16 (explainer-bound)"
timeout 60 python3 scripts/benchmark_measures.py 64 --device cuda \
  --measures sparseness,complexity,pointing_game,energy_pointing_game
timeout 240 python3 scripts/benchmark_measures.py 16 --device cuda \
  --measures max_sensitivity,avg_sensitivity,model_randomisation,random_logit
step done
