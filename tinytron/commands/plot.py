"""Plot training curves of one or more runs from their metrics.jsonl.

    tinytron-plot logs/run_a logs/run_b --out curves.png [--x step|tokens]
    python -m tinytron.commands.plot ...       (the same)

One figure, four panels: train and validation loss, learning rate, grad norm, tokens/s; runs are
overlaid and labelled by their run folder name. Non-finite or unmeasured values (null) are gaps.
"""

import os

from matplotlib.figure import Figure

from tinytron.training.arguments import FlagParser
from tinytron.training.metrics import METRICS_FILE, read_records

FIGSIZE, DPI = (12, 8), 100  # the PNG is FIGSIZE * DPI pixels
# (panel title, [(metrics key, line style)], log-scale y)
PANELS = [("loss", [("train/loss", "-"), ("val/loss", "o--")], False),
          ("learning rate", [("train/lr", "-")], False),
          ("grad norm", [("train/grad_norm", "-")], True),
          ("tokens/s", [("perf/tokens_per_s", "-")], False)]


def read_metrics(run_dir: str) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl. Raises FileNotFoundError."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE} (not a Tinytron run folder?)")
    return read_records(path)


def plot_runs(run_dirs: list[str], out: str, x: str = "step") -> None:
    """Write the curves of `run_dirs` to the image `out` (format from its extension); x is
    "step" or "tokens". Uses no pyplot, so the caller's matplotlib backend is left alone."""
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', not {x!r}")
    runs = [(os.path.basename(os.path.normpath(d)), read_metrics(d)) for d in run_dirs]
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2).flat
    for ax, (title, series, log_y) in zip(axes, PANELS):
        for i, (label, records) in enumerate(runs):
            for key, style in series:
                points = [(r[x], r[key]) for r in records if r.get(x) is not None and r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    name = label if len(series) == 1 else f"{label} {key.split('/')[0]}"
                    # color C<i>: run i has the same color in every panel
                    ax.plot(xs, ys, style, color=f"C{i}", label=name, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(x)
        if log_y:
            ax.set_yscale("log")
        if ax.has_data():
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.savefig(out)


def main(argv: list[str] | None = None) -> None:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="curves.png", help="image to write (default: curves.png)")
    parser.add_argument("--x", default="step", choices=("step", "tokens"), help="x-axis (default: step)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.out, args.x)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print(f"[tinytron] wrote {args.out}")


if __name__ == "__main__":
    main()
