#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm_real.py and for developers:
#   sudo bash .ci/slurm_up.sh        (stop it: sudo bash .ci/slurm_down.sh)
# Debian's slurm-wlm and munge (installed with apt-get when missing): munged, slurmctld and slurmd
# as root, one node named `hostname -s` with the CPUs and memory `slurmd -C` finds, select/cons_tres,
# proctrack/linuxproc, task/none, no accounting, a short credential lifetime (a requeued job waits
# cred_expire + 1 s before it may start again; Slurm's default is 120 s) and a scheduler that looks
# every few seconds. Idempotent: with the daemons up and the configuration unchanged it only checks.
# Exit 0 once `sinfo` shows the node idle; otherwise one line "slurm_up: not started: REASON" on
# stderr and a non-zero exit (callers skip the real-Slurm tests with that reason).
#
# Environment: SLURM_UP_CRED_EXPIRE (seconds, default 5), SLURM_UP_WAIT (seconds to wait for the
# node, default 60).
set -euo pipefail

fail() {
    echo "slurm_up: not started: $*" >&2
    exit 1
}

[[ "$(id -u)" == 0 ]] || fail "needs root (it installs packages and runs slurmctld, slurmd and munged as root)"

if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null \
        || ! command -v sbatch > /dev/null; then
    command -v apt-get > /dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get"
    echo "slurm_up: apt-get install slurm-wlm munge"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          slurm-wlm munge; } > /tmp/slurm_up.apt.log 2>&1 \
        || fail "apt-get install slurm-wlm munge failed (last lines: $(tail -n 3 /tmp/slurm_up.apt.log | tr '\n' ' '))"
fi

host="$(hostname -s)"
conf=/etc/slurm/slurm.conf
clean_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C)  # the daemons keep nothing of the caller's job
# The node line as slurmd sees the hardware (CPUs, sockets, cores, threads, RealMemory).
node="$("${clean_env[@]}" slurmd -C 2> /dev/null | head -n 1)" || true
[[ "${node}" == NodeName=* ]] || fail "slurmd -C did not describe this node"
node="${node/#NodeName=* CPUs=/NodeName=${host} NodeAddr=127.0.0.1 CPUs=}"

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
new_conf="$(cat <<EOF
# Written by llmpi's .ci/slurm_up.sh: a one-node cluster for tests and development.
ClusterName=llmpi
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${SLURM_UP_CRED_EXPIRE:-5}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
${node} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
)"

running() {  # running NAME: a process of that exact name is alive
    pgrep -x "$1" > /dev/null
}

if [[ -s "${conf}" ]] && [[ "$(head -n 1 "${conf}")" != "${new_conf%%$'\n'*}" ]]; then
    fail "${conf} was not written by this script (a real cluster's?): leaving it and its daemons alone"
fi
changed=0
if [[ ! -f "${conf}" ]] || [[ "$(cat "${conf}")" != "${new_conf}" ]]; then
    printf '%s\n' "${new_conf}" > "${conf}"
    changed=1
fi

chown munge:munge /run/munge
if ! running munged; then
    [[ -s /etc/munge/munge.key ]] || "${clean_env[@]}" runuser -u munge -- mungekey --create \
        || fail "no /etc/munge/munge.key and mungekey could not create one"
    "${clean_env[@]}" runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do
    munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break
    sleep 0.2
done
munge -n 2> /dev/null | unmunge > /dev/null 2>&1 || fail "munge does not answer (see /var/log/munge/munged.log)"

if [[ "${changed}" == 1 ]]; then  # a new configuration: restart what runs on the old one
    bash "$(dirname "${BASH_SOURCE[0]}")/slurm_down.sh" --keep-munge || fail "the daemons of the old configuration do not stop"
fi
if ! running slurmctld; then
    "${clean_env[@]}" slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! running slurmd; then
    "${clean_env[@]}" slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

state=""
for _ in $(seq "$(( ${SLURM_UP_WAIT:-60} * 2 ))"); do
    state="$(sinfo -h -n "${host}" -o %T 2> /dev/null | head -n 1)" || true
    case "${state}" in
        idle | mixed | allocated | completing) break ;;
        down* | drain*) scontrol update nodename="${host}" state=resume > /dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "${state}" in
    idle | mixed | allocated | completing) ;;
    *) fail "node ${host} is '${state:-not listed}' after ${SLURM_UP_WAIT:-60} s (see /var/log/slurm/slurmd.log)" ;;
esac
echo "slurm_up: node ${host} ${state}: $(sinfo -h -n "${host}" -o '%c CPUs, %m MB, partition %P') ($(sinfo -V))"
