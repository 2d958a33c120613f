#!/bin/bash
# Shared by the stand-in Slurm commands: append "=== NAME", one "arg X" line per argument and
# the thread/Slurm environment ("env K=V") to $FAKE_SLURM_LOG, for tests/test_slurm.py to read.
record() {
    local name=$1
    shift
    {
        echo "=== ${name}"
        for a in "$@"; do printf 'arg %s\n' "${a}"; done
        env | grep -E '^((OMP|OPENBLAS|MKL)_NUM_THREADS|SLURM_[A-Z_]+)=' | sort | sed 's/^/env /' || true
    } >> "${FAKE_SLURM_LOG:?set FAKE_SLURM_LOG to a log file}"
}
