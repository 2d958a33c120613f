#!/bin/bash
# Train one llmpi job under Slurm:  sbatch slurm/train.sh [JOB.toml] [section.key=value | --flag ...]
# Bare section.key=value arguments become --set overrides; anything else goes to the trainer as is.
# GPT-2 124M on your own BPE corpus (prepare data/corpus_gpt2.h5 first, see README):
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 --time=24:00:00 slurm/train.sh gpt2_124m model.dtype=bf16
# The run directory is runs/<job name>-<job id>, so a requeued job (same id) finds its checkpoints
# and resumes. To continue a run in a new job: sbatch --export=ALL,LLMPI_RUN_NAME=NAME slurm/train.sh
#
# Environment: LLMPI_VENV (a virtualenv to activate), LLMPI_LAUNCHER=srun|mpirun (default srun),
# LLMPI_SRUN_MPI (srun --mpi plugin, default pmi2; Open MPI 5 wants pmix), LLMPI_OUT_DIR (default runs),
# LLMPI_RUN_NAME. Without Slurm (plain bash) it runs mpiexec -n ${NP:-4}.
#
#SBATCH --job-name=llmpi
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
# USR1 two minutes before the time limit goes to the job steps (the ranks): they checkpoint and exit.
#SBATCH --signal=USR1@120
#SBATCH --requeue
#
# Site modules, if your cluster needs them:
# module load python/3.11 openmpi/4.1

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "${LLMPI_VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "${LLMPI_VENV}/bin/activate"
fi

# One BLAS/OpenMP thread pool per rank, sized to the cores Slurm gave the task.
threads="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="${threads}" OPENBLAS_NUM_THREADS="${threads}" MKL_NUM_THREADS="${threads}"

out_dir="${LLMPI_OUT_DIR:-runs}"
args=()
previous=""
for a in "$@"; do
    # a bare section.key=value becomes --set; one that already follows --set stays as it is
    if [[ "${a}" != -* && "${a}" == *.*=* && "${previous}" != --set ]]; then
        args+=(--set "${a}")
    else
        args+=("${a}")
    fi
    previous="${a}"
done
if [[ -n "${LLMPI_OUT_DIR:-}" ]]; then
    args=(--set "train.out_dir=${out_dir}" "${args[@]}")
fi

run_name="${LLMPI_RUN_NAME:-}"
if [[ -z "${run_name}" && -n "${SLURM_JOB_ID:-}" ]]; then
    run_name="${SLURM_JOB_NAME:-llmpi}-${SLURM_JOB_ID}"
fi
flags=()
if [[ -n "${run_name}" ]]; then
    flags+=(--run-name "${run_name}")
    # The trainer refuses --resume without a checkpoint, so a job requeued before its
    # first checkpoint starts afresh instead.
    if compgen -G "${out_dir}/${run_name}/ckpt_*.h5" > /dev/null; then
        flags+=(--resume)
    elif [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
        echo "train.sh: requeued (restart ${SLURM_RESTART_COUNT}) before the first checkpoint: starting afresh"
    fi
fi
if [[ -n "${SLURM_GPUS_PER_TASK:-}" || -n "${SLURM_GPUS:-}" ]]; then
    flags+=(--device gpu)
fi

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    launcher=(mpiexec -n "${NP:-4}")
elif [[ "${LLMPI_LAUNCHER:-srun}" == mpirun ]]; then
    launcher=(mpirun -np "${SLURM_NTASKS}")
else
    launcher=(srun --mpi="${LLMPI_SRUN_MPI:-pmi2}")
fi

# Run the launcher in the background so a USR1 sent to this shell (sbatch --signal=B:USR1@120,
# the way to warn ranks started by mpirun) is forwarded to it; srun and mpirun pass it on to the ranks.
"${launcher[@]}" python -m llmpi.train "${flags[@]}" "${args[@]}" &
pid=$!
forwarded=0
trap 'forwarded=1; kill -USR1 "${pid}" 2>/dev/null || true' USR1
while true; do
    forwarded=0
    wait "${pid}" && status=0 || status=$?
    # A trapped signal interrupts wait while the launcher runs on: wait again for its real status.
    [[ "${forwarded}" == 1 ]] || break
done
exit "${status}"
