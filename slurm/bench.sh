#!/bin/bash
# Benchmark the all-reduce algorithms and training throughput across the allocation:
#   sbatch slurm/bench.sh [extra args for both benches]   (or: bash slurm/bench.sh)
# Results (JSON from rank 0) go to runs/bench-<id>/{allreduce,train}.json and to the job log.
#
# Environment: LLMPI_VENV, LLMPI_LAUNCHER=srun|mpirun, LLMPI_SRUN_MPI (default pmi2), LLMPI_OUT_DIR.
#
#SBATCH --job-name=llmpi-bench
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
#
# module load python/3.11 openmpi/4.1

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "${LLMPI_VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "${LLMPI_VENV}/bin/activate"
fi

threads="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="${threads}" OPENBLAS_NUM_THREADS="${threads}" MKL_NUM_THREADS="${threads}"

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    id="${SLURM_JOB_ID}"
    if [[ "${LLMPI_LAUNCHER:-srun}" == mpirun ]]; then
        launcher=(mpirun -np "${SLURM_NTASKS}")
    else
        launcher=(srun --mpi="${LLMPI_SRUN_MPI:-pmi2}")
    fi
else
    id="local-$(date +%Y%m%d-%H%M%S)"
    launcher=(mpiexec -n "${NP:-4}")
fi
out="${LLMPI_OUT_DIR:-runs}/bench-${id}"
mkdir -p "${out}"

for bench in allreduce train; do
    "${launcher[@]}" python -m llmpi.bench "${bench}" --json "$@" | tee "${out}/${bench}.json"
done
