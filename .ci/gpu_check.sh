#!/usr/bin/env bash
# The one GPU check (run on a machine with a CUDA GPU and CuPy), in five parts, most important first:
#   tests        the kernels against their NumPy layers and the whole model on the GPU (all precisions)
#   train        llmpi vs PyTorch training throughput at GPT-2 124M (every precision, the CUDA-graph
#                step, torch.compile, the bf16 batch sweep 16, 32; the per-op breakdown of llmpi's step)
#   kernels      the kernel benchmark (each kernel checked, then timed back to back)
#   train_tests  GPU training under mpirun (2 ranks sharing the GPU, NCCL at 1 rank), the captured
#                step (CUDA graphs), the page-locked staging
#   baby         the baby config in float32 vs bf16 (CORPUS: the tinyshakespeare text, default
#                ../shared/data/tinyshakespeare.txt): final val losses within 1%
# ONLY=a,b runs those parts. BUDGET_S=N skips, from then on, every part whose time limit would end
# past N seconds from the start, and says which to rerun: on a short device lease run
# `BUDGET_S=560 bash .ci/gpu_check.sh` in one call of 600 s, then the ONLY=... it prints.
# Everything is teed into $OUT (default /tmp/llmpi_gpu_check); bench_*.json are the benchmarks'
# JSON lines.
# Exit status: 0 only if every part run passed (the tests, the benchmarks' reference checks).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/llmpi_gpu_check}"
PY="${PYTHON:-python3}"
ONLY="${ONLY:-all}"
BUDGET_S="${BUDGET_S:-0}"  # 0: no limit
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Open MPI refuses root unless told (the lent GPU machines run as root)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
status=0
skipped=""
want() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }
# run <part> <seconds>: whether to run the part now (asked for, and its limit fits the budget)
run() {
    want "$1" || return 1
    if [ "$BUDGET_S" -gt 0 ] && [ $((SECONDS + $2)) -gt "$BUDGET_S" ]; then
        echo "gpu_check: $1 skipped at ${SECONDS} s (its ${2} s limit would pass BUDGET_S=$BUDGET_S)" | tee -a "$OUT/device.txt"
        skipped="${skipped:+$skipped,}$1"
        return 1
    fi
    echo "gpu_check: $1 at ${SECONDS} s" | tee -a "$OUT/device.txt"
}

# The lent machines run their image's python3 and packages, with no network: llmpi's pure-Python
# dependencies it lacks (tomli-w on the image of 2026-11) come as wheels in .whl/, made here with
# `pip download --no-deps --only-binary=:all: -d .whl tomli-w` and sent with the device call's
# carry [".whl"]. Without them nothing else can run, so say so before spending any time.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -n 3
fi
if ! "$PY" -c "import llmpi.train, llmpi.bench.train" 2>"$OUT/import_error.txt"; then
    echo "gpu_check: llmpi does not import with $PY: $(tail -n 1 "$OUT/import_error.txt"); carry the missing" \
         "packages as wheels in .whl/ (see the top of this script)" | tee -a "$OUT/device.txt"
    exit 1
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import cupy, numpy; from cupy.cuda import nccl; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'nccl', nccl.get_version(), 'numpy', numpy.__version__)"
} 2>&1 | tee -a "$OUT/device.txt"

if run tests 200; then
    # the nvcc compile check and the CPU kernel emulator are CPU CI's jobs; here NVRTC compiles
    # each kernel file once (disk-cached)
    timeout 200 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_bf16.py tests/test_gpu_model.py -q -rs \
        -p no:cacheprovider -k "not nvcc and not emulated" 2>&1 | tee "$OUT/pytest.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if run train 420; then
    # batch 8 for every variant (torch.compile and llmpi with CUDA graphs included), then llmpi bf16
    # (graphs) and torch bf16 at 16 and 32
    timeout 420 "$PY" -m llmpi.bench train --device gpu --json --steps 6 --warmup 2 --sweep 16,32 2>&1 \
        | tee "$OUT/bench_train.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -n 1 "$OUT/bench_train.txt" > "$OUT/bench_train.json"
fi

if run kernels 90; then
    timeout 90 "$PY" -m llmpi.bench kernels --json --repeats 15 2>&1 | tee "$OUT/bench_kernels.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -n 1 "$OUT/bench_kernels.txt" > "$OUT/bench_kernels.json"
fi

if run train_tests 200; then
    timeout 200 "$PY" -m pytest tests/test_gpu_train.py tests/test_gpu_graph.py tests/test_comm_device.py -q -rs \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest_train.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if run baby 300; then
    # bf16 accuracy: the baby config (jobs/shakespeare_char.toml) in float32 and in bf16 on the GPU;
    # the final val losses must agree within 1%. The runs live in a temporary directory (only
    # the log comes back in $OUT).
    corpus="${CORPUS:-../shared/data/tinyshakespeare.txt}"
    if [ -f "$corpus" ]; then
        runs="$(mktemp -d)"
        {
            "$PY" -m llmpi.data prepare --input "$corpus" --tokenizer char --out "$runs/shakespeare_char.h5" &&
            for dtype in float32 bf16; do
                timeout 150 "$PY" -m llmpi.train shakespeare_char --device gpu --run-name "$dtype" \
                    --set "data.path=$runs/shakespeare_char.h5" --set "model.dtype=$dtype" \
                    --set "train.out_dir=$runs" --set train.log_interval=500 || exit 1
            done &&
            "$PY" -m llmpi.compare "$runs/float32" "$runs/bf16" &&
            "$PY" - "$runs" <<'PY'
import sys
from llmpi.training import metrics
fp32, bf16 = (metrics.read(f"{sys.argv[1]}/{r}/metrics.h5")["evals"]["val_loss"][-1] for r in ("float32", "bf16"))
gap = abs(bf16 - fp32) / fp32
print(f"baby val loss: float32 {fp32:.4f}, bf16 {bf16:.4f}, gap {100 * gap:.2f}% (target <= 1%)")
sys.exit(0 if gap <= 0.01 else 1)
PY
        } 2>&1 | tee "$OUT/baby.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        rm -rf "$runs"
    else
        echo "baby: no corpus at $corpus (set CORPUS), skipped" | tee "$OUT/baby.txt"
    fi
fi

echo "gpu_check ($ONLY): exit $status after ${SECONDS} s${skipped:+; not run: ONLY=$skipped}" | tee -a "$OUT/device.txt"
exit $status
