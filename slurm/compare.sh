#!/bin/bash
# Train comparison runs on the same allocation, one after the other, then compare them:
#   sbatch slurm/compare.sh [section.key=value ...]   (or: bash slurm/compare.sh)
# The overrides apply to every run. By default the pair sync + async: runs/<job name>-sync-<id>,
# runs/<job name>-async-<id>; plot: runs/compare-<id>.png (matplotlib, a dependency of llmpi).
# Without Slurm it uses mpiexec -n ${NP:-4} and a time-stamped id.
#
# The study (every method on the same sample budget, across worker counts, with a straggler):
#   LLMPI_METHODS="sync async async-staleness async-dc async-ssp local" LLMPI_RANKS="2 4 8 16" \
#   LLMPI_SLOWED="no yes" bash slurm/compare.sh train.max_iters=400 ...
# runs every method at every rank count, without and with rank 1 slowed 2x (runs named
# <job name>-<method>-p<ranks>[-slow]-<id>). On a cluster make it one array, a task per
# (ranks, slowed) pair: sbatch --ntasks=16 --array=0-7 slurm/compare.sh (each task compares all
# the runs of the array present when it ends, so the last one to finish draws every point).
#
# Environment: LLMPI_VENV, LLMPI_LAUNCHER=srun|mpirun, LLMPI_SRUN_MPI (default pmi2),
# LLMPI_OUT_DIR (default runs), LLMPI_SYNC_JOB / LLMPI_ASYNC_JOB / LLMPI_LOCAL_JOB (default
# jobs/compare_{sync,async,local}.toml), LLMPI_METHODS (sync async async-staleness async-dc
# async-ssp local; default "sync async"; async-ssp is plain async with parallel.max_staleness=1),
# LLMPI_RANKS (default: one size, the allocation's or NP), LLMPI_SLOWED
# (no, yes or "no yes"; default no), LLMPI_TARGET_LOSS (default: the highest final val loss),
# LLMPI_REQUEUE (default 1; 0: end the job after the checkpoint the time-limit warning asks for).
#
#SBATCH --job-name=llmpi-compare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
##SBATCH --gpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
# USR1 before the time limit goes to this shell, which forwards it to the training under way; once
# that run has checkpointed, the job requeues itself (as slurm/train.sh; LLMPI_REQUEUE=0: it ends).
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
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
read -r -a methods <<< "${LLMPI_METHODS:-sync async}"
read -r -a ranks <<< "${LLMPI_RANKS:-}"
read -r -a slowed <<< "${LLMPI_SLOWED:-no}"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    id="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}"
else
    id="local-$(date +%Y%m%d-%H%M%S)"
fi
name="${SLURM_JOB_NAME:-llmpi-compare}"

launcher_for() {  # launcher_for NP|"": sets `launcher` to start NP ranks, or the allocation's (NP, default 4, without Slurm)
    local n="$1"
    if [[ -n "${SLURM_JOB_ID:-}" && "${LLMPI_LAUNCHER:-srun}" == mpirun ]]; then
        launcher=(mpirun -np "${n:-${SLURM_NTASKS}}")
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        launcher=(srun --mpi="${LLMPI_SRUN_MPI:-pmi2}" ${n:+-n "${n}"})
    else
        launcher=(mpiexec -n "${n:-${NP:-4}}")
    fi
}

common=(--set "train.out_dir=${out_dir}")
for a in "$@"; do
    common+=(--set "${a}")
done
if [[ -n "${SLURM_GPUS_PER_TASK:-}" || -n "${SLURM_GPUS:-}" ]]; then
    common+=(--device gpu)
fi

job_of() {  # job_of METHOD: the job file and overrides of a method
    case "$1" in
        sync) echo "${LLMPI_SYNC_JOB:-jobs/compare_sync.toml}" ;;
        async) echo "${LLMPI_ASYNC_JOB:-jobs/compare_async.toml}" ;;
        async-staleness | async-dc) echo "${LLMPI_ASYNC_JOB:-jobs/compare_async.toml} --set parallel.async_rule=${1#async-}" ;;
        async-ssp) echo "${LLMPI_ASYNC_JOB:-jobs/compare_async.toml} --set parallel.max_staleness=1" ;;
        local) echo "${LLMPI_LOCAL_JOB:-jobs/compare_local.toml}" ;;
        *) echo "compare.sh: unknown method '$1' in LLMPI_METHODS (sync async async-staleness async-dc async-ssp local)" >&2
           exit 2 ;;
    esac
}

train() {  # train NP RUN_NAME JOB [ARGS...]: resumes when a requeued job already checkpointed this run
    local n="$1" run_name="$2"
    shift 2
    if [[ "${warned}" == 1 ]]; then  # warned between two runs
        stop_for_requeue
    fi
    local flags=(--run-name "${run_name}")
    if compgen -G "${out_dir}/${run_name}/ckpt_*.h5" > /dev/null; then
        flags+=(--resume)
    fi
    # The launcher itself in the background (not a subshell: one would die of the USR1 the trap
    # below forwards), so the warning reaches it and through it the ranks.
    launcher_for "${n}"
    "${launcher[@]}" python -m llmpi.train "$@" "${flags[@]}" "${common[@]}" &
    pid=$!
    local status
    while true; do
        forwarded=0
        wait "${pid}" && status=0 || status=$?
        [[ "${forwarded}" == 1 ]] || break  # the trap interrupted wait: the launcher runs on
    done
    pid=""
    if [[ "${warned}" == 1 && "${status}" == 0 ]]; then
        stop_for_requeue
    fi
    return "${status}"
}

stop_for_requeue() {  # warned: the runs so far have checkpointed, no time is left for the next ones
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        exit 0
    elif [[ "${LLMPI_REQUEUE:-1}" == 0 ]]; then
        echo "compare.sh: stopped by USR1 after a checkpoint; not requeued (LLMPI_REQUEUE=0)"
        exit 0
    fi
    echo "compare.sh: stopped by USR1 after a checkpoint: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
}
pid=""
warned=0
forwarded=0
trap 'warned=1; if [[ -n "${pid}" ]]; then forwarded=1; kill -USR1 "${pid}" 2>/dev/null || true; fi' USR1

# (ranks, slowed) pairs; one Slurm array task takes one of them
pairs=()
for n in "${ranks[@]:-}"; do
    for slow in "${slowed[@]}"; do
        pairs+=("${n}:${slow}")
    done
done
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" && ${#pairs[@]} -gt 1 ]]; then
    pairs=("${pairs[SLURM_ARRAY_TASK_ID]}")
fi

runs=()
for pair in "${pairs[@]}"; do
    n="${pair%%:*}" slow="${pair#*:}"
    tag="${n:+-p${n}}"
    extra=()
    if [[ "${slow}" == yes ]]; then
        tag+="-slow"
        extra=(--slowdown "1=2")
    fi
    for method in "${methods[@]}"; do
        read -r -a job <<< "$(job_of "${method}")"
        run_name="${name}-${method}${tag}-${id}"
        train "${n}" "${run_name}" "${job[@]}" "${extra[@]}"
        runs+=("${out_dir}/${run_name}")
    done
done
for d in "${out_dir}/${name}"-*-"${id}"; do  # an array's other tasks' runs, where present
    if [[ -d "${d}" && " ${runs[*]} " != *" ${d} "* ]]; then
        runs+=("${d}")
    fi
done
target=()
if [[ -n "${LLMPI_TARGET_LOSS:-}" ]]; then
    target=(--target-loss "${LLMPI_TARGET_LOSS}")
fi
python -m llmpi.compare "${runs[@]}" "${target[@]}" --plot "${out_dir}/compare-${id}.png"
