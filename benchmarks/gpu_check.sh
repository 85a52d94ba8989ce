#!/usr/bin/env bash
# GPU readiness of unipan, in one run: install the project, run the CUDA tests, time 100 AMP
# training iterations of every registered model at 800x1216 with batch 2 (random init, synthetic
# scenes), run benchmarks/inference_speed.py and benchmarks/spinet_speed.py (SPINet's Table 2:
# network and post-processing beside UPSNet at 1024x2048) on CUDA, and print one table (model,
# train s/iter, inference ms, peak memory).
#
#   bash benchmarks/gpu_check.sh                       # on a CUDA machine
#   bash benchmarks/gpu_check.sh --no-install          # the project is installed already
#   bash benchmarks/gpu_check.sh --device cpu --iters 2 --size 128 192   # smoke mode, any machine
#
# The smoke mode runs every step's code on the CPU (no install unless --install, the CUDA tests
# collected but skipped, inference_speed.py for one model and one run, float32 training) so the
# script can be checked without a GPU. Without CUDA the default mode stops at once with a message saying so.
# Environment: PYTHON (default python3), GPU_CHECK_LOG (log folder, default $TMPDIR/unipan_gpu_check).
set -euo pipefail

DEVICE=cuda
ITERS=100
SIZE_H=800
SIZE_W=1216
INSTALL=auto
INFER_RUNS=5
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --iters) ITERS="$2"; shift 2 ;;
        --size) SIZE_H="$2"; SIZE_W="$3"; shift 3 ;;
        --no-install) INSTALL=no; shift ;;
        --install) INSTALL=yes; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_LOG:-${TMPDIR:-/tmp}/unipan_gpu_check}"
mkdir -p "$OUT"
SMOKE=0
INFER_MODELS=()
BENCH_SMOKE=()
SPINET_SPEED=(--runs "$INFER_RUNS")
if [ "$DEVICE" = cpu ]; then
    SMOKE=1
    INFER_RUNS=1
    # one model beside torchvision's Mask R-CNN: every model at 800x1216 takes minutes on a CPU
    INFER_MODELS=(--models panoptic_fpn)
    BENCH_SMOKE=(--warmup 1 --infer-runs 1)
    SPINET_SPEED=(--runs 1 --size 256 512)
    [ "$INSTALL" = auto ] && INSTALL=no
fi

step() { printf '\n=== %s ===\n' "$*"; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }

# --- 0. a CUDA device, before anything is installed ---------------------------------------------
if [ "$SMOKE" = 0 ]; then
    command -v nvidia-smi >/dev/null 2>&1 || die "no CUDA device: nvidia-smi is not on PATH (for the CPU smoke mode: --device cpu --iters 2 --size 128 192)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || die "no CUDA device: nvidia-smi cannot query a GPU"
fi

# --- 1. install ---------------------------------------------------------------------------------
if [ "$INSTALL" != no ]; then
    step "install"
    # a torch that is installed already (the machine's CUDA build) satisfies the requirement and
    # stays; --no-build-isolation: no download of the build backend on a machine without network
    set +e
    "$PY" -m pip install --no-build-isolation -e ".[test]" > "$OUT/install.txt" 2>&1
    rc=$?
    set -e
    tail -n 2 "$OUT/install.txt"
    [ "$rc" = 0 ] || die "pip install -e .[test] failed (exit $rc); see $OUT/install.txt"
fi
"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check: error: no CUDA device: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    print("device:", torch.cuda.get_device_name(torch.device(device)))
EOF

# --- 2. the CUDA tests --------------------------------------------------------------------------
step "CUDA tests"
mapfile -t CUDA_TEST_FILES < <(grep -rlE "cuda" tests --include='test_*.py' | sort)
[ "${#CUDA_TEST_FILES[@]}" -gt 0 ] || die "no test file mentions cuda"
# the tests named *cuda* (they skip themselves without a device); -rs lists the skipped ones
set +e
"$PY" -m pytest -q -p no:cacheprovider -rs -k cuda "${CUDA_TEST_FILES[@]}" 2>&1 | tee "$OUT/cuda_tests.txt"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || die "CUDA tests failed (exit $rc); see $OUT/cuda_tests.txt"
if [ "$SMOKE" = 0 ] && grep -q "SKIPPED" "$OUT/cuda_tests.txt"; then
    die "CUDA tests were skipped on a CUDA machine; see $OUT/cuda_tests.txt"
fi

# --- 3. inference_speed.py on the device ---------------------------------------------------------
step "benchmarks/inference_speed.py --device $DEVICE"
"$PY" benchmarks/inference_speed.py --device "$DEVICE" --runs "$INFER_RUNS" "${INFER_MODELS[@]}" 2>&1 \
    | tee "$OUT/inference_speed.txt"
[ "${PIPESTATUS[0]}" = 0 ] || die "inference_speed.py failed; see $OUT/inference_speed.txt"

step "benchmarks/spinet_speed.py --device $DEVICE"
"$PY" benchmarks/spinet_speed.py --device "$DEVICE" "${SPINET_SPEED[@]}" 2>&1 | tee "$OUT/spinet_speed.txt"
[ "${PIPESTATUS[0]}" = 0 ] || die "spinet_speed.py failed; see $OUT/spinet_speed.txt"

# --- 4. AMP training and inference of every model: the table -------------------------------------
step "training ($ITERS iterations, batch 2, ${SIZE_H}x${SIZE_W}) and inference of every registered model"
"$PY" benchmarks/gpu_train_bench.py --device "$DEVICE" --iters "$ITERS" --size "$SIZE_H" "$SIZE_W" "${BENCH_SMOKE[@]}" \
    --json "$OUT/gpu_train_bench.json" 2>&1 | tee "$OUT/gpu_train_bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || die "gpu_train_bench.py failed; see $OUT/gpu_train_bench.txt"

step "result"
sed -n '/^| model/,$p' "$OUT/gpu_train_bench.txt"
echo "(logs in $OUT/)"
