#!/usr/bin/env bash
# Compile-check every kernels/*.cu for Ampere (sm_80) and Hopper (sm_90) with warnings as
# errors, and the timing kernel that llmpi/bench/kernels.py carries inline. Needs only nvcc,
# no GPU: CPU CI runs it. Skips (exit 0) when nvcc is absent.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "nvcc_check: nvcc not found, skipping"
    exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
PYTHONPATH="$root" "${PYTHON:-python}" -c 'from llmpi.bench.kernels import SPIN_SOURCE; print(SPIN_SOURCE)' \
    > "$out/bench_spin.cu" || status=1
for cu in "$root"/kernels/*.cu "$out/bench_spin.cu"; do
    for arch in sm_80 sm_90; do
        name="$(basename "$cu" .cu)"
        if nvcc -arch="$arch" -cubin -std=c++17 -Werror all-warnings -Xcompiler -Wall \
            "$cu" -o "$out/$name.$arch.cubin"; then
            echo "ok    $arch $(basename "$cu")"
        else
            echo "FAIL  $arch $(basename "$cu")"
            status=1
        fi
    done
done
exit $status
