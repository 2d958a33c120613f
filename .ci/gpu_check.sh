#!/usr/bin/env bash
# The one GPU check (run on a machine with a CUDA GPU and CuPy): the kernel tests, the whole
# model on the GPU, GPU training under mpirun (2 ranks sharing the GPU, and NCCL at 1 rank), the
# captured step (CUDA graphs),
# then the kernel benchmark, llmpi-vs-PyTorch training throughput at GPT-2 124M (with the
# per-op breakdown of llmpi's step), and the baby config in float32 vs bf16 (CORPUS: the
# tinyshakespeare text, default ../shared/data/tinyshakespeare.txt).
# Everything is teed into $OUT (default /tmp/llmpi_gpu_check); bench_*.json are the
# benchmarks' JSON lines. Budget: the tests about 5 minutes, the benchmarks about 6 (GPT-2 124M
# children for every variant); on a 15-minute device budget run it as two calls, ONLY=tests and
# then ONLY=kernels,train,baby.
# ONLY=tests|kernels|train|baby, or a comma list of them, runs those parts (a rerun after a fix).
# Exit status: 0 only if the tests and the benchmarks' reference checks all passed.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/llmpi_gpu_check}"
PY="${PYTHON:-python3}"
ONLY="${ONLY:-all}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Open MPI refuses root unless told (the lent GPU machines run as root)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
status=0
want() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import cupy, numpy; from cupy.cuda import nccl; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'nccl', nccl.get_version(), 'numpy', numpy.__version__)"
} 2>&1 | tee -a "$OUT/device.txt"

if want tests; then
    # the nvcc compile check and the CPU kernel emulator are CPU CI's jobs; here NVRTC compiles
    # each kernel file once (disk-cached)
    timeout 150 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_bf16.py tests/test_gpu_model.py -x -q -rs \
        -p no:cacheprovider -k "not nvcc and not emulated" 2>&1 | tee "$OUT/pytest.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    timeout 200 "$PY" -m pytest tests/test_gpu_train.py tests/test_gpu_graph.py tests/test_comm_device.py -x -q -rs \
        -p no:cacheprovider 2>&1 \
        | tee -a "$OUT/pytest.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want kernels; then
    timeout 90 "$PY" -m llmpi.bench kernels --json --repeats 15 2>&1 | tee "$OUT/bench_kernels.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -n 1 "$OUT/bench_kernels.txt" > "$OUT/bench_kernels.json"
fi

if want train; then
    # batch 8 for every variant (torch.compile and llmpi with CUDA graphs included), then llmpi bf16
    # (graphs) and torch bf16 at 16 and 32
    timeout 390 "$PY" -m llmpi.bench train --device gpu --json --steps 6 --warmup 2 --sweep 16,32 2>&1 \
        | tee "$OUT/bench_train.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -n 1 "$OUT/bench_train.txt" > "$OUT/bench_train.json"
fi

if want baby; then
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

echo "gpu_check ($ONLY): exit $status" | tee -a "$OUT/device.txt"
exit $status
