"""`python -m llmpi COMMAND`: small tools live here; the big entry points have their own modules."""
import sys

from .cli import run_main
from .errors import UserError

# Commands that are modules of their own: say where they are instead of wrapping them,
# so their --help, exit codes and MPI start-up stay exactly theirs.
ELSEWHERE = {
    "train": "python -m llmpi.train [JOB.toml] [--set section.key=value ...]",
    "data": "python -m llmpi.data prepare ...",
    "compare": "python -m llmpi.compare runs/A runs/B [--plot out.png]",
    "bench": "python -m llmpi.bench NAME [--json]",
}

USAGE = """usage: python -m llmpi COMMAND [options]

commands:
  info      versions, MPI library (CUDA-aware?), world size, threads, kernels
            (run it under your launcher too: mpiexec -n 4 python -m llmpi info)
elsewhere:
""" + "\n".join(f"  {name:<9} {cmd}" for name, cmd in ELSEWHERE.items())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        from . import info
        return info.main(rest)
    if command in ELSEWHERE:
        raise UserError(f"'{command}' is its own module: use {ELSEWHERE[command]}")
    raise UserError(f"unknown command {command!r}; choose one of: info, {', '.join(ELSEWHERE)}")


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi", check_launcher=False) or 0)
