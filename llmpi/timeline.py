"""The pipeline timeline of a run (runs/NAME/timeline.h5, written by llmpi.training.pipeline):
per rank and step, when each micro-batch's forward (F) and backward (B) ran, when the rank waited
for a neighbour, and the all-reduce and optimizer phases. `python -m llmpi.compare --timeline RUN`
draws it with the ranks as rows, the picture pipeline tutorials draw by hand, and prints each
rank's busy share."""
import os

import h5py
import numpy as np

from .errors import UserError

COLORS = {"F": "#4C72B0", "B": "#55A868", "wait": "#DDDDDD", "allreduce": "#DD8452", "optimizer": "#8172B3"}


def read(run_dir):
    path = os.path.join(run_dir, "timeline.h5")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no timeline.h5; it is written by pipeline runs "
                        "(parallel.pipeline > 1) of at least 4 steps")
    try:
        with h5py.File(path, "r") as f:
            kinds = [str(k) for k in f.attrs["kinds"]]
            rows = {k: f[k][()] for k in ("rank", "step", "kind", "micro_batch", "start", "end")}
    except (OSError, KeyError) as err:
        raise UserError(f"{path} is not a readable llmpi timeline ({err})") from None
    rows["kind"] = np.array([kinds[int(k)] for k in rows["kind"]])
    return rows


def summary(rows):
    """Per rank: the share of the recorded steps spent in F and B (the rest is waiting and the rest
    of the step)."""
    lines = []
    for r in sorted(set(rows["rank"].astype(int))):
        mine = rows["rank"] == r
        busy = rows["end"][mine] - rows["start"][mine]
        compute = busy[np.isin(rows["kind"][mine], ("F", "B"))].sum()
        steps = sorted(set(rows["step"][mine]))
        span = sum(rows["end"][mine & (rows["step"] == s)].max() for s in steps)
        lines.append(f"rank {r}: compute {100 * compute / max(span, 1e-12):.0f}% of {len(steps)} recorded steps")
    return "\n".join(lines)


def draw(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--timeline needs matplotlib: pip install 'llmpi[plot]'") from None
    step = min(rows["step"])  # the first recorded step
    sel = rows["step"] == step
    ranks = sorted(set(rows["rank"][sel].astype(int)))
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    for r, kind, mb, t0, t1 in zip(rows["rank"][sel], rows["kind"][sel], rows["micro_batch"][sel],
                                   rows["start"][sel], rows["end"][sel]):
        y = ranks.index(int(r))
        ax.barh(y, (t1 - t0) * 1e3, left=t0 * 1e3, color=COLORS[kind], edgecolor="white", height=0.8)
        if kind in ("F", "B") and (t1 - t0) > 0:
            ax.text((t0 + t1) / 2 * 1e3, y, f"{kind}{int(mb)}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel(f"ms since the start of step {int(step)}")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()], labels=list(COLORS),
              ncol=len(COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def save_figure(fig, out):
    """Write a figure under a temporary name and rename it (no half-written PNG); a path that
    cannot be written is one line, not a traceback."""
    tmp = out + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write the figure {out} ({err.strerror}); choose another --plot path") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
