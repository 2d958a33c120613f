#!/usr/bin/env bash
# Stop the one-node cluster of .ci/slurm_up.sh: slurmd, slurmctld and munged, each by its pid file
# (jobs still running are killed with slurmd). Its state (/var/spool/slurm*) and configuration stay.
#   sudo bash .ci/slurm_down.sh [--keep-munge]
set -euo pipefail

stop() {  # stop NAME PIDFILE: TERM the daemon named in PIDFILE and wait (10 s) until it is gone
    local name=$1 pidfile=$2 pid
    [[ -s "${pidfile}" ]] || return 0
    pid="$(cat "${pidfile}")"
    if [[ "$(cat "/proc/${pid}/comm" 2> /dev/null)" != "${name}" ]]; then
        return 0  # stale pid file
    fi
    kill "${pid}"
    for _ in $(seq 50); do
        [[ -d "/proc/${pid}" ]] || { echo "slurm_down: stopped ${name} (pid ${pid})"; return 0; }
        sleep 0.2
    done
    echo "slurm_down: ${name} (pid ${pid}) still runs after 10 s" >&2
    return 1
}

[[ "$(id -u)" == 0 ]] || { echo "slurm_down: needs root" >&2; exit 1; }
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
if [[ "${1:-}" != --keep-munge ]]; then  # slurm_up.sh keeps munged when it restarts Slurm on a new config
    stop munged /run/munge/munged.pid
fi
