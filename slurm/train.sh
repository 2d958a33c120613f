#!/bin/bash
# Train one llmpi job under Slurm:  sbatch slurm/train.sh [JOB.toml] [section.key=value | --flag ...]
# Bare section.key=value arguments become --set overrides; anything else goes to the trainer as is.
# GPT-2 124M on your own BPE corpus (prepare data/corpus_gpt2.h5 first, see README):
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 --time=24:00:00 slurm/train.sh gpt2_124m model.dtype=bf16
# The run directory is runs/<job name>-<job id>, so a requeued job (same id) finds its checkpoints
# and resumes. To continue a run in a new job: sbatch --export=ALL,LLMPI_RUN_NAME=NAME slurm/train.sh
# Near the time limit Slurm sends this shell USR1; it passes it on to the ranks, which checkpoint and
# exit 0, and then requeues the job (scontrol requeue: same id, so it resumes). The same by hand:
# scancel --batch --signal=USR1 JOBID. LLMPI_REQUEUE=0 ends the job after the checkpoint instead.
#
# Environment: LLMPI_VENV (a virtualenv to activate), LLMPI_LAUNCHER=srun|mpirun (default srun),
# LLMPI_SRUN_MPI (srun --mpi plugin, default pmi2; Open MPI 5 wants pmix), LLMPI_OUT_DIR (default runs),
# LLMPI_RUN_NAME, LLMPI_REQUEUE (default 1). Without Slurm (plain bash) it runs mpiexec -n ${NP:-4}.
#
#SBATCH --job-name=llmpi
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
# USR1 two minutes before the time limit (Slurm may send it up to a minute earlier) goes to this
# shell (B:), which forwards it to the ranks and, once they have checkpointed, requeues the job.
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# A requeued job writes on at the end of the same log.
#SBATCH --open-mode=append
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

# Run the launcher in the background so a USR1 sent to this shell (the time-limit warning above, or
# scancel --batch --signal=USR1) is forwarded to it; srun and mpirun pass it on to the ranks.
"${launcher[@]}" python -m llmpi.train "${flags[@]}" "${args[@]}" &
pid=$!
forwarded=0
warned=0
trap 'forwarded=1; warned=1; kill -USR1 "${pid}" 2>/dev/null || true' USR1
while true; do
    forwarded=0
    wait "${pid}" && status=0 || status=$?
    # A trapped signal interrupts wait while the launcher runs on: wait again for its real status.
    [[ "${forwarded}" == 1 ]] || break
done
# Warned and the trainer exited 0: it stopped at a step boundary after writing a checkpoint (or it had
# just finished; the requeued job then resumes at the last step and ends at once). The requeued job
# keeps this job id, so it finds the run directory above and resumes.
if [[ "${warned}" == 1 && "${status}" == 0 && -n "${SLURM_JOB_ID:-}" ]]; then
    if [[ "${LLMPI_REQUEUE:-1}" == 0 ]]; then
        echo "train.sh: stopped by USR1 after a checkpoint; not requeued (LLMPI_REQUEUE=0)"
    else
        echo "train.sh: stopped by USR1 after a checkpoint: requeueing job ${SLURM_JOB_ID} (restart" \
             "$(( ${SLURM_RESTART_COUNT:-0} + 1 ))); LLMPI_REQUEUE=0 turns this off"
        scontrol requeue "${SLURM_JOB_ID}" || status=$?
    fi
fi
exit "${status}"
