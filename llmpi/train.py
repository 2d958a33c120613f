"""`python -m llmpi.train [JOB] [--set section.key=value ...]`: train a GPT under MPI.

One command for one process or many: `mpiexec -n 4 python -m llmpi.train jobs/default.toml`.
This module is the command line only: it resolves the job, builds the run (llmpi.training.run,
or llmpi.training.pipeline with parallel.pipeline or parallel.tensor > 1) and hands it to the loop of the job's
`parallel.mode` (llmpi.training: sync all-reduce or async RMA) or to the pipeline loop.
"""
import argparse
import sys

from .cli import set_thread_defaults

set_thread_defaults()

from . import backend, config as config_mod  # noqa: E402  (thread counts must be set before NumPy loads BLAS)
from .cli import ArgumentParser, run_main  # noqa: E402
from .comm.world import agree, world  # noqa: E402
from .training import LOOPS  # noqa: E402
from .training.grid_auto import choose_grid  # noqa: E402
from .training.pipeline import PipelineRun, train_pipeline  # noqa: E402
from .training.run import Run  # noqa: E402


def parse_args(argv):
    p = ArgumentParser(
        prog="python -m llmpi.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT under MPI: data parallel (sync all-reduce, async RMA or local SGD), "
                    "pipeline stages on a data x pipeline grid.",
        epilog="job keys (set in the job file or with --set section.key=value), with their built-in "
               "defaults, which the job file overrides:\n"
               + config_mod.describe())
    p.add_argument("job", nargs="?", default="default",
                   help="job file, or a name in jobs/ (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one job key; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if the run directory already holds checkpoints")
    p.add_argument("--run-name", default=None, help="run directory name under train.out_dir "
                   "(default: train.run_name, else the job file's name)")
    p.add_argument("--device", default=None, choices=backend.DEVICES, help="overrides train.device")
    p.add_argument("--slowdown", default=None, metavar="RANK=FACTOR[,RANK=FACTOR]",
                   help="make ranks slower by sleeping (FACTOR-1) x their compute time")
    return p.parse_args(argv)


def resolve_job(args):
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.slowdown is not None:
        overrides.append(f"parallel.slowdown={args.slowdown}")
    return config_mod.load_job(args.job, overrides)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    comm = world()
    job = agree(lambda: resolve_job(args), comm)
    if job.parallel.grid == "auto":
        choose_grid(job, comm)
    if job.parallel.pipeline > 1 or job.parallel.tensor > 1:  # model parallel: a data x pipeline x tensor grid
        run, loop = PipelineRun(job, args, comm), train_pipeline
    else:  # the whole model on every rank
        run, loop = Run(job, args, comm), LOOPS[job.parallel.mode]
    run.describe()
    return loop(run)  # the loop disarms the watchdog when it ends


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.train") or 0)
