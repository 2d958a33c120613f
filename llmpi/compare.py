"""`python -m llmpi.compare runs/A runs/B ... [--target-loss X] [--plot out.png]`.

Puts runs side by side from their metrics.h5 (and the config.toml beside it, which names the
method: sync, async and its rule, local SGD and its H, slowed when a rank was): final val loss,
samples and updates, wall time, updates/s, the time and samples needed to reach a target val
loss (by default the highest final val loss among the runs, which every run reaches), staleness
(async runs), the bytes communicated per sample and the share of time spent communicating.
The figure shows loss vs samples, loss vs wall time, the staleness histogram, and per method
final val loss, time to target and bytes per sample vs the number of ranks; --plot-ranks draws
those three alone (a study across worker counts, where the per-run curves are too many to read).
"""
import json
import os
import sys

import numpy as np

from . import config, timeline
from .cli import ArgumentParser, run_main
from .comm.world import agree, rank
from .errors import UserError
from .model.gpt import parameter_bytes
from .training import metrics
from .training.metrics import bits_per_byte


def load_run(run_dir):
    path = os.path.join(run_dir, "metrics.h5")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.h5; is it a run directory (runs/NAME)?")
    try:
        m = metrics.read(path)
    except (OSError, KeyError) as err:
        raise UserError(f"{path} is not a readable llmpi metrics file ({err})") from None
    m["name"] = os.path.basename(os.path.normpath(run_dir))
    job_path = os.path.join(run_dir, "config.toml")
    m["job"] = config.from_toml_text(open(job_path).read()) if os.path.isfile(job_path) else None
    return m


def method(m):
    """What a run compares as: its mode, async rule or H, and whether a rank was slowed."""
    job, mode = m["job"], str(m["attrs"].get("mode", "sync"))
    if job is None:
        return mode
    p = job.parallel
    label = {"async": f"async {p.async_rule}", "local": f"local H={p.local_steps}"}.get(mode, mode)
    if mode == "local" and p.outer_momentum > 0:
        label += " outer"
    if mode == "async" and p.max_staleness >= 0:
        label += f" SSP {p.max_staleness}"
    return label + (" slowed" if p.slowdown else "")


def comm_bytes_per_sample(m):
    """Bytes sent plus received per sample, all ranks together (metrics' comm_bytes); sync logs
    do not count them, so there it is the gradient all-reduce's n bytes out and n in per rank."""
    s, job = m["steps"], m["job"]
    samples = float(s["samples"][-1]) if len(s["samples"]) else 0.0
    counted = s["comm_bytes"][s["comm_bytes"] >= 0] if len(s.get("comm_bytes", [])) else np.array([])
    if not samples:
        return None
    if counted.size:
        return float(counted.sum()) / samples
    if job is None or str(m["attrs"].get("mode", "sync")) != "sync" or job.parallel.pipeline > 1:
        return None
    world = int(m["attrs"].get("world_size", 1))
    return 2.0 * parameter_bytes(job.model) * (world if world > 1 else 0) * len(s["step"]) / samples


def summarize(m, target=None):
    s, e = m["steps"], m["evals"]
    world = int(m["attrs"].get("world_size", 1))
    mode = str(m["attrs"].get("mode", "sync"))
    wall = float(s["wall"][-1]) if len(s["wall"]) else 0.0
    stale = s["staleness"][s["staleness"] >= 0] if len(s.get("staleness", [])) else np.array([])
    # Sync logs rank 0's comm time per step; async logs every worker's pushes.
    comm_total = float(np.sum(s["comm"])) / (world if mode == "async" else 1)
    row = {
        "run": m["name"], "mode": mode, "method": method(m), "ranks": world,
        "final_val_loss": float(e["val_loss"][-1]) if len(e["val_loss"]) else float("nan"),
        "final_val_bits_per_byte": bits_per_byte(float(e["val_loss"][-1]), float(m["attrs"].get("bytes_per_token", 0)))
        if len(e["val_loss"]) else None,
        "samples": int(s["samples"][-1]) if len(s["samples"]) else 0,
        "updates": int(len(s["step"])),
        "wall_s": wall,
        "updates_per_s": len(s["step"]) / wall if wall else 0.0,
        "staleness_mean": float(stale.mean()) if stale.size else None,
        "staleness_p95": float(np.percentile(stale, 95)) if stale.size else None,
        "staleness_max": int(stale.max()) if stale.size else None,
        "comm_share": comm_total / wall if wall else 0.0,
        "comm_bytes_per_sample": comm_bytes_per_sample(m),
        "time_to_target_s": None, "samples_to_target": None,
    }
    if target is not None and len(e["val_loss"]):
        hit = np.nonzero(e["val_loss"] <= target)[0]
        if hit.size:
            row["time_to_target_s"] = float(e["wall"][hit[0]])
            row["samples_to_target"] = int(e["samples"][hit[0]])
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def default_target(runs):
    """The highest final val loss among the runs: the lowest target every one of them reaches."""
    finals = [float(m["evals"]["val_loss"][-1]) for m in runs if len(m["evals"]["val_loss"])]
    return max(finals) if finals else None


def table(rows, target, chosen=True):
    head = (f"{'run':<24} {'method':<17} {'P':>2} {'val loss':>8} {'bits/B':>6} {'samples':>9} {'updates':>7} "
            f"{'wall s':>8} {'upd/s':>7} {'t->tgt s':>8} {'smp->tgt':>9} {'stale mean/p95/max':>18} {'B/sample':>9} {'comm':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        stale = "-" if r["staleness_mean"] is None else \
            f"{r['staleness_mean']:.1f}/{r['staleness_p95']:.0f}/{r['staleness_max']}"
        lines.append(f"{r['run'][:24]:<24} {r['method'][:17]:<17} {r['ranks']:>2} {r['final_val_loss']:>8.4f} "
                     f"{_fmt(r['final_val_bits_per_byte'], '.3f'):>6} "
                     f"{r['samples']:>9} {r['updates']:>7} {r['wall_s']:>8.1f} {r['updates_per_s']:>7.1f} "
                     f"{_fmt(r['time_to_target_s'], '.1f'):>8} {_fmt(r['samples_to_target'], 'd'):>9} "
                     f"{stale:>18} {_fmt(r['comm_bytes_per_sample'], '9.3g'):>9} {100 * r['comm_share']:>4.0f}%")
    if target is not None:
        why = "" if chosen else " (the highest of the runs' final losses; --target-loss sets another)"
        lines.append(f"target loss: {target:.4f}{why}")
    return "\n".join(lines)


def _plot_vs_ranks(ax, rows, target):
    """One line per method over the ranks it ran at: final val loss, time to target, bytes/sample."""
    reach = "time to target (s)" if target is None else f"time to val loss {target:.3f} (s)"
    panels = (("final_val_loss", "final val loss"), ("time_to_target_s", reach),
              ("comm_bytes_per_sample", "bytes communicated per sample"))
    names = sorted({r["method"] for r in rows})
    # one colour per method, the same in every panel; its straggler runs dashed in that colour
    bases = sorted({n.removesuffix(" slowed") for n in names})
    colour = {b: f"C{i % 10}" for i, b in enumerate(bases)}
    for a, (key, title) in zip(ax, panels):
        for name in names:
            points = sorted((r["ranks"], r[key]) for r in rows if r["method"] == name and r[key] is not None)
            slowed = name.endswith(" slowed")
            if points:
                a.plot(*zip(*points), marker="s" if slowed else "o", ms=4, ls="--" if slowed else "-",
                       color=colour[name.removesuffix(" slowed")], label=name)
        a.set(xlabel="ranks", title=f"{title} vs ranks")
        a.set_xscale("log", base=2)
    if any((r["comm_bytes_per_sample"] or 0) > 0 for r in rows):  # a log axis needs a positive value
        ax[2].set_yscale("log")


def _pyplot(option):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{option} needs matplotlib: pip install 'llmpi[plot]'") from None
    return plt


def plot_ranks(rows, target, out):
    """Final val loss, time to target and bytes per sample vs ranks, one line per method."""
    fig, axes = _pyplot("--plot-ranks").subplots(1, 3, figsize=(18, 6))
    _plot_vs_ranks(axes, rows, target)
    for a in axes:
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    timeline.save_figure(fig, out)


def plot(runs, rows, target, out):
    fig, axes = _pyplot("--plot").subplots(2, 3, figsize=(16, 9))
    ax = axes[0]
    for m in runs:
        s, e = m["steps"], m["evals"]
        label = m["name"]
        ax[0].plot(s["samples"], s["loss"], alpha=0.35, lw=0.8)
        ax[0].plot(e["samples"], e["val_loss"], marker="o", ms=3, label=f"{label} (val)",
                   color=ax[0].lines[-1].get_color())
        ax[1].plot(e["wall"], e["val_loss"], marker="o", ms=3, label=label)
        stale = s["staleness"][s["staleness"] >= 0]
        if stale.size:
            ax[2].hist(stale, bins=np.arange(stale.max() + 2) - 0.5, alpha=0.6, label=label)
    ax[0].set(xlabel="samples", ylabel="loss (train faint, val marked)", title="loss vs samples")
    ax[1].set(xlabel="wall time (s)", ylabel="val loss", title="loss vs wall time")
    ax[2].set(xlabel="staleness (updates)", ylabel="pushes", title="staleness (async runs)")
    _plot_vs_ranks(axes[1], rows, target)
    for a in axes.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    timeline.save_figure(fig, out)


def _parser():
    p = ArgumentParser(prog="python -m llmpi.compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run directories (runs/NAME)")
    p.add_argument("--timeline", default=None, metavar="RUN",
                   help="draw a pipeline run's timeline (ranks as rows) into --plot, default RUN/timeline.png")
    p.add_argument("--target-loss", type=float, default=None,
                   help="val loss for time/samples-to-target (default: the highest final val loss of the runs)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write the figure here")
    p.add_argument("--plot-ranks", default=None, metavar="OUT.png",
                   help="write the vs-ranks panels alone here (final loss, time to target, bytes per sample)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object last")
    return p


def main(argv=None):
    _run(_parser().parse_args(argv))
    return 0


def command(argv=None):
    """`python -m llmpi.compare`: under mpiexec rank 0 reports, and its errors end every rank."""
    args = _parser().parse_args(argv)
    agree(lambda: _run(args) if rank() == 0 else None)
    return 0


def _run(args):
    if not args.runs and not args.timeline:
        raise UserError("give run directories to compare, or --timeline RUN")
    figure = args.plot or (os.path.join(args.timeline, "timeline.png") if args.timeline else None)
    for option, path in (("--plot", figure), ("--plot-ranks", args.plot_ranks)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise UserError(f"{option} {path}: its directory does not exist; create it or choose another path")
        if folder and not os.access(folder, os.W_OK):
            raise UserError(f"{option} {path}: its directory {folder} is not writable; choose another path")
    if args.timeline:
        rows = timeline.read(args.timeline)
        out = args.plot or os.path.join(args.timeline, "timeline.png")
        print(timeline.summary(rows))
        timeline.draw(rows, out)
        print(f"figure: {out}")
        if not args.runs:
            return
        args.plot = None
    runs = [load_run(r) for r in args.runs]
    target = default_target(runs) if args.target_loss is None else args.target_loss
    rows = [summarize(m, target) for m in runs]
    print(table(rows, target, chosen=args.target_loss is not None))
    if args.plot:
        plot(runs, rows, target, args.plot)
        print(f"figure: {args.plot}")
    if args.plot_ranks:
        plot_ranks(rows, target, args.plot_ranks)
        print(f"figure: {args.plot_ranks}")
    if args.json:
        print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    sys.exit(run_main(command, prog="llmpi.compare") or 0)
