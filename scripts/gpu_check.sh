#!/usr/bin/env bash
# One prepared check for a lent GPU, at most about 8 minutes on one data-centre GPU; prints one table.
#
#   scripts/gpu_check.sh              on CUDA (refuses to run without a GPU)
#   scripts/gpu_check.sh --dry-run    the same steps on the CPU at toy sizes, so that the script cannot rot
#                                     (tests/test_gpu_check.py runs it)
#
# The dry run keeps its steps short: one device test, one extraction at 4 images, 20 classes of training, no demo.
# Steps: the device tests on CUDA (tests/test_device.py with TASKRES_TEST_DEVICE=cuda: the device placement that
# mutation testing cannot check on a CPU, docs/mutation.md); the demo on CUDA; extraction at real size (RN50 and
# ViT-B/16 with random weights, generated JPEGs, fp32 and fp16; scripts/benchmark.py, whole processes against a
# bare encoder process); training at real size (1000 classes x 16 shots, 200 epochs, against the bare products);
# a one-GPU torchrun (NCCL) of `taskres zeroshot`. Environment: PYTHON (default: python), the interpreter whose
# environment has taskres and its test extra installed. Exit status: 0 when every step passed, 1 otherwise,
# 2 for a usage error or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ $DRY == 1 ]]; then
    DEV=cpu IMAGES=4 EPOCHS=2 CLASSES=20 DEMO=() TIMEOUT=600 TESTS=(-k closed-form)
    EXTRACT=("RN50 fp32")
else
    DEV=cuda IMAGES=2000 EPOCHS=200 CLASSES=1000 DEMO=(demo) TIMEOUT=150 TESTS=()
    EXTRACT=("RN50 fp32" "RN50 fp16" "ViT-B-16 fp32" "ViT-B-16 fp16")
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no GPU; run on a GPU machine, or pass --dry-run for the CPU parts." >&2
        exit 2
    fi
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ROWS=()
FAILED=0

# step NAME FIGURE_PATTERN CMD...: runs CMD (at most TIMEOUT s), logs it, adds a row with the last output line that
# matches FIGURE_PATTERN (grep -E).
step() {
    local name=$1 pattern=$2
    shift 2
    local log="$OUT/$(echo "$name" | tr -c 'A-Za-z0-9' '_').log" t0 rc secs status figure
    t0=$(date +%s%N)
    timeout "$TIMEOUT" "$@" >"$log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    if [[ $rc == 0 ]]; then status=ok; else status="FAIL($rc)"; FAILED=1; fi
    figure=$(grep -E "$pattern" "$log" | tail -1 | tr -s ' ' | cut -c1-110)
    [[ $rc != 0 ]] && figure="$(tail -1 "$log" | cut -c1-110)"
    ROWS+=("$(printf '%-34s %-8s %7s  %s' "$name" "$status" "$secs" "$figure")")
}

"$PY" - "$OUT/images" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split in ("train", "test"):
    for name in ("cat", "dog", "fish", "bird"):
        folder = Path(sys.argv[1]) / split / name
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
EOF

step "device tests ($DEV)" "passed|failed" \
    env TASKRES_TEST_DEVICE=$DEV "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py "${TESTS[@]}"
if [[ ${#DEMO[@]} -gt 0 ]]; then
    step "demo ($DEV, 1 seed)" "." "$PY" -m taskres demo --device $DEV --seeds 1 --quiet --out "$OUT/demo"
fi
for spec in "${EXTRACT[@]}"; do
    read -r arch precision <<<"$spec"
    step "extraction $arch $precision" "^extraction" "$PY" scripts/benchmark.py --only extraction --device $DEV \
        --images $IMAGES --rounds 1 --arch "$arch" --precision "$precision"
done
step "training, $EPOCHS epochs" "^training" \
    "$PY" scripts/benchmark.py --only training --device $DEV --epochs $EPOCHS \
    --train-classes $CLASSES
step "torchrun 1 process ($([[ $DEV == cuda ]] && echo NCCL || echo gloo))" "accuracy" \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m taskres zeroshot \
    --data "$OUT/images" --backbone taskres-demo --device $DEV --cache-dir "$OUT/cache" --out "$OUT/zs"

echo
printf '%-34s %-8s %7s  %s\n' "step" "status" "seconds" "figure"
for row in "${ROWS[@]}"; do echo "$row"; done
"$PY" -c "import torch; print('torch', torch.__version__, '| device:', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
exit $FAILED
