"""Whose temporary file is this, and is its writer still running? For the temporaries that a
killed `prepare` leaves next to its output (DATA.h5.tmpPID/, 6-10 MB of scratch per rank and the
half-written tokens.h5) and for the run lock (llmpi.training.lock), which records its holder the
same way.

A writer is recorded as {host, pid, start}: start is its start time in clock ticks from /proc, so
a pid reused by a later process does not pass for the writer. Only a writer of this host can be
checked; one of another host (a shared file system) is taken to be alive.
"""
import json
import os
import re
import shutil
import socket
import time

OWNER = "owner.json"            # inside a prepare scratch directory: who is writing it
STALE_UNOWNED_S = 600           # a scratch directory without OWNER (older llmpi) untouched this long


def process_start(pid):
    """(state, start time in clock ticks) of a process from /proc, or None where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def alive(pid, start=None):
    """Whether process `pid` of this host still runs: a zombie (killed, not yet reaped) or a pid
    reused by a process that started at another time is gone too."""
    if os.path.isdir("/proc"):
        found = process_start(pid)
        return found is not None and found[0] != "Z" and (start is None or found[1] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def me():
    """This process as a writer record."""
    found = process_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": found[1] if found else None}


def gone(record):
    """Whether the writer of `record` is known to be dead: of this host and no longer running."""
    pid = int(record.get("pid", 0) or 0)
    return record.get("host") == socket.gethostname() and pid > 0 and not alive(pid, record.get("start"))


def mark(scratch):
    """Record this process as the writer of the scratch directory (before anything else is in it)."""
    with open(os.path.join(scratch, OWNER), "w") as f:
        json.dump(me(), f)


def _newest_change(folder):
    times = [os.path.getmtime(folder)]  # a directory's own time changes only when entries come or go
    for name in os.listdir(folder):
        try:
            times.append(os.path.getmtime(os.path.join(folder, name)))
        except OSError:  # removed meanwhile
            pass
    return max(times)


def _stale(scratch, pid):
    if not os.path.isdir(scratch):  # a single temporary file (what an older prepare left)
        return not alive(pid) and time.time() - os.path.getmtime(scratch) > STALE_UNOWNED_S
    try:
        with open(os.path.join(scratch, OWNER)) as f:
            return gone(json.load(f))
    except FileNotFoundError:  # an older llmpi, or killed between mkdir and mark: judged by pid and age
        return not alive(pid) and time.time() - _newest_change(scratch) > STALE_UNOWNED_S
    except (OSError, ValueError):  # half-written record: its writer was killed within a moment of starting
        return time.time() - _newest_change(scratch) > STALE_UNOWNED_S


def clean_stale(out):
    """Remove the scratch directories (OUT.tmpPID) of prepares of `out` whose writer is dead;
    returns the paths removed. A live writer's (on this host or, unknowable, another) stays."""
    folder, base = os.path.split(os.path.abspath(out))
    pattern = re.compile(re.escape(base) + r"\.tmp(\d+)$")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet: nothing left behind
        return removed
    for name in sorted(names):
        m = pattern.match(name)
        path = os.path.join(folder, name)
        if m and _stale(path, int(m.group(1))):
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            except OSError:  # not ours to remove (permissions), or another cleaner was first
                continue
            removed.append(path)
    return removed
