#!/bin/bash
# Train the sync and the async job of a comparison pair on the same allocation, one after the
# other, then compare them:  sbatch slurm/compare.sh [section.key=value ...]   (or: bash slurm/compare.sh)
# The overrides apply to both runs. Runs: runs/<job name>-sync-<id>, runs/<job name>-async-<id>;
# plot: runs/compare-<id>.png. Without Slurm it uses mpiexec -n ${NP:-4} and a time-stamped id.
#
# Environment: LLMPI_VENV, LLMPI_LAUNCHER=srun|mpirun, LLMPI_SRUN_MPI (default pmi2),
# LLMPI_OUT_DIR (default runs), LLMPI_SYNC_JOB / LLMPI_ASYNC_JOB (default jobs/compare_{sync,async}.toml).
#
#SBATCH --job-name=llmpi-compare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=USR1@120
#SBATCH --requeue
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

out_dir="${LLMPI_OUT_DIR:-runs}"
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
name="${SLURM_JOB_NAME:-llmpi-compare}"

common=(--set "train.out_dir=${out_dir}")
for a in "$@"; do
    common+=(--set "${a}")
done
if [[ -n "${SLURM_GPUS_PER_TASK:-}" || -n "${SLURM_GPUS:-}" ]]; then
    common+=(--device gpu)
fi

train() {  # train JOB RUN_NAME: resumes when a requeued job already checkpointed this run
    local flags=(--run-name "$2")
    if compgen -G "${out_dir}/$2/ckpt_*.h5" > /dev/null; then
        flags+=(--resume)
    fi
    "${launcher[@]}" python -m llmpi.train "$1" "${flags[@]}" "${common[@]}"
}

sync_run="${name}-sync-${id}"
async_run="${name}-async-${id}"
train "${LLMPI_SYNC_JOB:-jobs/compare_sync.toml}" "${sync_run}"
train "${LLMPI_ASYNC_JOB:-jobs/compare_async.toml}" "${async_run}"
python -m llmpi.compare "${out_dir}/${sync_run}" "${out_dir}/${async_run}" --plot "${out_dir}/compare-${id}.png"
