#!/usr/bin/env bash
# The general model's full-width recipe on every real training tile, on one GPU, in a single run of under 10 minutes.
#
# Here, once, from the repository root (needs ../shared: the annotated sets and the wheels the GPU image lacks):
#     bash benchmarks/gpu_train.sh --prepare
# fills the ignored .gpu_train/ (about 30 MB: monai, ignite, fire, nibabel, termcolor; CoNSeP, NuCLS and MoNuSeg, whose
# 1000² PNGs are re-encoded as JPEG quality 95 so that everything fits the 64 MiB copied with the repository).
# Then, on the GPU machine, from the repository root with .gpu_train/ beside it:
#     bash benchmarks/gpu_train.sh            # EPOCHS=40 TRAIN_SECONDS=420 by default
# (EPOCHS=1 TRAIN_SECONDS=300 EXTRA=--reduced OUT=/tmp/x bash benchmarks/gpu_train.sh checks the script on a CPU)
# converts the sets into PanNuke folds (benchmarks/real_data_check.py), trains BasicUNet 32-32-64-128-256-32 with the
# bundle's train.json (batch 16, validation bPQ every epoch picks the best epoch), scores the test fold, and writes
# under $OUT: model.pt (the best epoch, a plain state dict), result.json (test scores, minutes, machine), the
# training log and device.txt.  A run cut by TRAIN_SECONDS still hands back its best epoch so far.  Back here, score
# and export it as the README in bundle/models/pretrained/ says.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu_train

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf "$PACK" && mkdir -p "$PACK/wheels" "$PACK/data"
    cp ../shared/wheels/*.whl "$PACK/wheels/"
    cp -r ../shared/data/consep ../shared/data/nucls "$PACK/data/"
    mkdir -p "$PACK/data/monuseg_train/images"
    cp -r ../shared/data/monuseg_train/labels "$PACK/data/monuseg_train/"
    python3 - <<'PY' || exit 1
from pathlib import Path
from PIL import Image
for png in sorted(Path("../shared/data/monuseg_train/images").glob("*.png")):
    Image.open(png).convert("RGB").save(Path(".gpu_train/data/monuseg_train/images") / f"{png.stem}.jpg", quality=95)
PY
    du -sh "$PACK"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_train}"
EPOCHS="${EPOCHS:-40}"
TRAIN_SECONDS="${TRAIN_SECONDS:-420}"
EXTRA="${EXTRA:-}"
mkdir -p "$OUT"
[[ -d "$PACK/data" ]] || { echo "$PACK/data is missing: run 'bash benchmarks/gpu_train.sh --prepare' first"; exit 1; }
if ! python3 -c "import monai, ignite, fire, nibabel" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$PACK"/wheels/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; date -u; } | tee "$OUT/device.txt"
WORK="${WORK:-/tmp/gpu_train_work}"
WORKERS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
# shellcheck disable=SC2206  # EXTRA is split into options on purpose
RECIPE=(benchmarks/real_data_check.py --shared "$PACK/data" --work "$WORK" --tag gpu_full --epochs "$EPOCHS"
    --batch_size 16 --features "[32,32,64,128,256,32]" $EXTRA)
timeout -k 20 "$TRAIN_SECONDS" python3 "${RECIPE[@]}" --num_workers "$WORKERS" 2>&1 | tee "$OUT/training.log"
status=${PIPESTATUS[0]}
RUN="$WORK/runs/gpu_full"
if [[ $status -ne 0 && -f "$RUN/models/model.pt" ]]; then  # cut by the time limit: score the best epoch so far
    timeout -k 20 120 python3 "${RECIPE[@]}" --skip_training 2>&1 | tail -20 | tee "$OUT/scoring.log"
fi
cp "$RUN/models/model.pt" "$RUN/result.json" "$OUT/" 2>/dev/null
echo "training exit $status (124: stopped by TRAIN_SECONDS)" | tee -a "$OUT/device.txt"
[[ -f "$OUT/model.pt" ]]
