#!/usr/bin/env bash
# The one GPU check (run on a machine with a CUDA GPU and CuPy): the kernel tests, the whole
# model on the GPU, then the kernel benchmark. Everything is teed into $OUT (default
# /tmp/llmpi_gpu_check); bench_kernels.json is the benchmark's JSON line. Budget: < 4 min.
# Exit status: 0 only if the tests and the benchmark's reference checks all passed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/llmpi_gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion(), 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/device.txt"

# the nvcc compile check is CPU CI's job; here NVRTC compiles each kernel file once (disk-cached)
timeout 140 "$PY" -m pytest tests/test_kernels.py tests/test_gpu_model.py -x -q -rs \
    -p no:cacheprovider -k "not nvcc" 2>&1 | tee "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 90 "$PY" -m llmpi.bench kernels --json --repeats 15 2>&1 | tee "$OUT/bench_kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tail -n 1 "$OUT/bench_kernels.txt" > "$OUT/bench_kernels.json"

echo "gpu_check: exit $status" | tee -a "$OUT/device.txt"
exit $status
