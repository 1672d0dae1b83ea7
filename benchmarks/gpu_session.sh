#!/usr/bin/env bash
# Every GPU figure in one device call: the whole-slide benchmark first (issue 11's goals), then run_all's table.
#
# Here, once, from the repository root (fills the ignored .whl/ with what the GPU image lacks, for its Python 3.12):
#     bash benchmarks/gpu_session.sh --prepare
# Then through the device tool, from the repository root:
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=420)
# About 6 minutes, so a 15-minute device budget leaves room for a rerun.  Each step's log lands in $OUT as it runs,
# beside the device's name, the versions imported and each step's exit status (status.txt); the script exits with
# the worst status.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl
    cp ../shared/wheels/*.whl .whl/  # monai, pytorch-ignite, fire, nibabel, termcolor
    # the slide readers and what they need beyond the image's packages (versions as in the development venv)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 -d .whl \
        openslide-bin==4.0.1.2 openslide-python==1.4.7 tiffslide==3.0.1 zarr==3.1.6 numcodecs==0.16.6 \
        donfig==0.8.1.post1 imagecodecs==2026.3.6 google-crc32c==1.9.0 tifffile==2026.3.3 scikit-image==0.26.0
    du -sh .whl
    exit 0
fi

OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
if ! python3 -c "import monai, ignite, fire, tiffslide, openslide" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: $DEVICE"; date -u; } | tee "$OUT/device.txt"
# tiffslide 3.0.1 wants tifffile < 2026.5.2, and the tissue mask scikit-image >= 0.26: check before spending time
python3 - <<'PY' 2>&1 | tee "$OUT/imports.txt" || exit 1
import importlib
names = "torch monai ignite fire nibabel openslide tiffslide zarr imagecodecs tifffile skimage".split()
versions = {n: getattr(importlib.import_module(n), "__version__", "?") for n in names}
print(" ".join(f"{n}={v}" for n, v in versions.items()))
assert tuple(int(x) for x in versions["skimage"].split(".")[:2]) >= (0, 26), "scikit-image older than 0.26"
PY
if [[ "$DEVICE" == cuda* ]]; then
    SLIDE=(--size 50000 --tissue_fraction 0.05 --num_workers 12 --tiles_per_batch 8)
else  # a check of this script on a CPU: a small slide
    SLIDE=(--size 4000 --tissue_fraction 0.1)
fi
timeout -k 15 210 python3 benchmarks/slide_speed.py --device "$DEVICE" "${SLIDE[@]}" --log "$OUT/slide_run.log" \
    2>&1 | tee "$OUT/slide_speed.txt"
slide=${PIPESTATUS[0]}
timeout -k 15 120 python3 benchmarks/run_all.py --device "$DEVICE" --skip fold_memory slide --verbose \
    2>&1 | tee "$OUT/run_all.txt"
table=${PIPESTATUS[0]}
echo "slide_speed: exit $slide; run_all: exit $table (124: stopped by its time limit)" | tee "$OUT/status.txt"
exit $(( slide > table ? slide : table ))
