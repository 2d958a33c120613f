"""The run directory's lock: one job at a time writes runs/NAME.

Rank 0 creates runs/NAME/.lock exclusively (O_CREAT | O_EXCL, which needs no flock, so it works
on file systems without it) and writes its host, pid, Slurm job id and start time into it; it
removes the file when the run ends. Another job that finds the file is refused with one line
naming the holder, unless the holder is gone: a lock of this host whose pid no longer runs is
stale (a killed job's), is removed with a note, and the new job takes it. A lock of another host
cannot be checked from here, so it is obeyed and the message says how to remove it.
"""
import json
import os
import socket
import time

from ..data.writers import alive, process_start
from ..errors import UserError

NAME = ".lock"


class RunLock:
    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, NAME)
        self.held = False
        self.note = None  # what was found and removed, for the caller to print

    def acquire(self):
        found = process_start(os.getpid())
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": found[1] if found else None,
              "job": os.environ.get("SLURM_JOB_ID", ""), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"run directory {os.path.dirname(self.path)} is being written by another job; "
                        "choose another --run-name or wait for it")

    def _remove_if_stale(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):  # half-written by a starter killed at that moment, or gone already
            holder = {}
        host, pid = holder.get("host"), int(holder.get("pid", 0) or 0)
        if holder and host == socket.gethostname() and pid and not alive(pid, holder.get("start")):
            os.remove(self.path)
            self.note = f"removed the stale lock of pid {pid} (no longer running) from {self.path}"
            return
        if not holder and os.path.exists(self.path) and time.time() - os.path.getmtime(self.path) > 60:
            os.remove(self.path)  # unreadable and old: not a starter that is still writing it
            self.note = f"removed an unreadable lock from {self.path}"
            return
        job = f", Slurm job {holder['job']}" if holder.get("job") else ""
        raise UserError(f"run directory {os.path.dirname(self.path)} is in use by pid {pid} on {host}{job} since "
                        f"{holder.get('since', '?')}; wait for it, choose another --run-name, or, if that job is "
                        f"gone, delete {self.path}")

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
