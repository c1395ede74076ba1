"""Pictures and a summary of training runs, from their TensorBoard event files.

    python -m largebatch.report RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A,B,...] [--x epoch|step]

writes into DIR (default RUN_DIR/report for one run; required for several):
  loss.png         training loss (solid) and validation loss (dashed)
  accuracy.png     top-1 and top-5: validation (solid), training top-1 (dotted)
  lr.png           the learning rate each step used
  throughput.png   training images/s
  trust_ratio.png  LARS/LAMB trust ratios (median, min, max), when the run logged them
  loss_scale.png   the loss scale and skipped steps, when the run used loss scaling
  summary.md       per run: state, epochs, best and final validation accuracy, time, images/s

Several runs share each plot, one colour per label (the run directory's name unless
``--labels`` says otherwise). Runs given the same label (the seeds of one configuration)
are drawn as their mean with a band from their minimum to their maximum, and get a line of
their own in the summary (mean and standard deviation over those runs).

The x axis is epochs when every run logged an epoch end (runs with different batch sizes
then line up), optimizer steps otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .argparsing import Parser, UsageError
from .events import histogram_tags, read_scalars, wall_time_spans


@dataclass(frozen=True)
class Series:
    tag: str
    name: str  # shown in the legend after the run's label ("" for a figure's only series)
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    ylabel: str
    series: tuple[Series, ...]
    log: bool = False


FIGURES: dict[str, tuple[Panel, ...]] = {
    "loss": (Panel("loss", (Series("train/loss", "train"), Series("val/loss", "val", "--"))),),
    "accuracy": (
        Panel("top-1 (%)", (Series("val/top1", "val"), Series("train/top1", "train", ":"))),
        Panel("top-5 (%)", (Series("val/top5", "val"),)),
    ),
    "lr": (Panel("learning rate", (Series("train/lr", ""),)),),
    "throughput": (Panel("images/s", (Series("train/images_per_sec", ""),)),),
    "trust_ratio": (
        Panel(
            "trust ratio",
            (
                Series("lars/trust_median", "median"),
                Series("lars/trust_min", "min", ":"),
                Series("lars/trust_max", "max", "--"),
            ),
            log=True,
        ),
    ),
    "loss_scale": (
        Panel("loss scale", (Series("train/loss_scale", ""),), log=True),
        Panel("skipped steps", (Series("train/skipped_steps", ""),)),
    ),
}


@dataclass
class Run:
    path: Path
    label: str
    scalars: dict[str, list[tuple[int, float]]]
    seconds: float  # time training: the sum of each job start's span of events
    state: str  # from status.json: running, stopped, finished (or unknown)
    histograms: set[str] = field(default_factory=set)

    @property
    def steps_per_epoch(self) -> float | None:
        """Every epoch has the same number of optimizer steps; the ``epoch`` scalar is logged
        at each epoch's last step."""
        points = self.scalars.get("epoch")
        if not points:
            return None
        step, epoch = points[-1]
        return step / epoch

    def curve(self, tag: str, x: str) -> tuple[np.ndarray, np.ndarray] | None:
        points = self.scalars.get(tag)
        if not points:
            return None
        steps, values = (np.array(v, dtype=float) for v in zip(*points))
        return (steps / self.steps_per_epoch if x == "epoch" else steps), values

    def last(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None


def load_run(path: Path, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory")
    if not any(path.glob("events.out.tfevents.*")):
        raise UsageError(f"{path} holds no TensorBoard event files (is it a run's --log-dir?)")
    state = "unknown"
    status = path / "status.json"
    if status.is_file():
        state = json.loads(status.read_text()).get("state", "unknown")
    seconds = sum(end - start for start, end in wall_time_spans(path))
    return Run(path, label or path.resolve().name, read_scalars(path), seconds, state, histogram_tags(path))


# --- plots ---------------------------------------------------------------------------------


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def _mean_band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean, min and max of several runs' curves on the x values of the shortest one."""
    xs = min((c[0] for c in curves), key=len)
    ys = np.stack([np.interp(xs, x, y) for x, y in curves])
    return xs, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot(runs: list[Run], panels: tuple[Panel, ...], path: Path, x: str, title: str | None = None) -> bool:
    """One PNG with a panel per entry of ``panels``; False (and no file) when no run has
    any of their tags."""
    if not any(r.scalars.get(s.tag) for p in panels for s in p.series for r in runs):
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login or compute node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for i, (label, group) in enumerate(_groups(runs).items()):
            colour = colours[i % len(colours)]
            for s in panel.series:
                curves = [c for c in (r.curve(s.tag, x) for r in group) if c is not None]
                if not curves:
                    continue
                name = f"{label} {s.name}".strip()
                if len(curves) == 1:
                    xs, ys = curves[0]
                    ax.plot(xs, ys, s.style, color=colour, label=name, marker="." if len(xs) < 30 else None)
                else:
                    xs, mean, low, high = _mean_band(curves)
                    ax.plot(xs, mean, s.style, color=colour, label=f"{name} (mean of {len(curves)})")
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch" if x == "epoch" else "optimizer step")
        ax.set_ylabel(panel.ylabel)
        if panel.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- summary -------------------------------------------------------------------------------


def summarize(run: Run) -> dict:
    val = run.scalars.get("val/top1", [])
    best_step, best = max(val, key=lambda p: p[1]) if val else (None, None)
    spe = run.steps_per_epoch
    rates = [v for _, v in run.scalars.get("train/images_per_sec", [])]
    epoch = run.last("epoch")
    return {
        "run": str(run.path),
        "label": run.label,
        "state": run.state,
        "epochs": round(epoch) if epoch is not None else 0,
        "steps": max((p[-1][0] for p in run.scalars.values() if p), default=0),
        "best_val_top1": best,
        "best_epoch": round(best_step / spe) if best_step is not None and spe else None,
        "final_val_top1": run.last("val/top1"),
        "final_val_top5": run.last("val/top5"),
        "final_train_loss": run.last("train/loss"),
        "seconds": round(run.seconds, 1),
        # the median resists the first report of each epoch, which includes loader start-up
        "median_images_per_sec": statistics.median(rates) if rates else None,
    }


def summarize_groups(summaries: list[dict]) -> list[dict]:
    """Mean and spread of the final and best validation top-1 over the runs of each label."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["label"], []).append(s)
    out = []
    for label, members in groups.items():
        final = [s["final_val_top1"] for s in members if s["final_val_top1"] is not None]
        best = [s["best_val_top1"] for s in members if s["best_val_top1"] is not None]
        out.append(
            {
                "label": label,
                "runs": len(members),
                "final_val_top1_mean": statistics.fmean(final) if final else None,
                "final_val_top1_std": statistics.stdev(final) if len(final) > 1 else 0.0 if final else None,
                "final_val_top1_min": min(final) if final else None,
                "final_val_top1_max": max(final) if final else None,
                "best_val_top1_mean": statistics.fmean(best) if best else None,
                "seconds_mean": statistics.fmean(s["seconds"] for s in members),
            }
        )
    return out


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def markdown(summaries: list[dict]) -> str:
    lines = [
        "| run | state | epochs | steps | best val top-1 (epoch) | final val top-1 | final val top-5 "
        "| final train loss | time | images/s (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        best = f"{_num(s['best_val_top1'])} ({s['best_epoch']})" if s["best_epoch"] else _num(s["best_val_top1"])
        name = Path(s["run"]).name
        shown = name if s["label"] == name else f"{s['label']} ({name})"
        lines.append(
            f"| {shown} | {s['state']} "
            f"| {s['epochs']} | {s['steps']} | {best} | {_num(s['final_val_top1'])} "
            f"| {_num(s['final_val_top5'])} | {_num(s['final_train_loss'], '.4f')} "
            f"| {duration(s['seconds'])} | {_num(s['median_images_per_sec'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def markdown_groups(groups: list[dict]) -> str:
    lines = [
        "| label | runs | final val top-1, mean ± std | min - max | best val top-1, mean | time, mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in groups:
        lines.append(
            f"| {g['label']} | {g['runs']} | {_num(g['final_val_top1_mean'])} ± "
            f"{_num(g['final_val_top1_std'])} | {_num(g['final_val_top1_min'])} - "
            f"{_num(g['final_val_top1_max'])} | {_num(g['best_val_top1_mean'])} "
            f"| {duration(g['seconds_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(runs: list[Run], out: Path, x: str | None = None) -> tuple[list[Path], str]:
    """Every figure that has data, and summary.md; returns the PNG paths and the summary."""
    x = x or ("epoch" if all(r.steps_per_epoch for r in runs) else "step")
    if x == "epoch" and not all(r.steps_per_epoch for r in runs):
        lacking = next(r for r in runs if not r.steps_per_epoch)
        raise UsageError(f"--x epoch: {lacking.path} has not finished an epoch yet; use --x step")
    out.mkdir(parents=True, exist_ok=True)
    pictures = [out / f"{name}.png" for name, panels in FIGURES.items() if plot(runs, panels, out / f"{name}.png", x)]
    summaries = [summarize(r) for r in runs]
    text = "# Training runs\n\n" + markdown(summaries)
    if len(_groups(runs)) < len(runs):
        text += "\n## Runs with the same label\n\n" + markdown_groups(summarize_groups(summaries))
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures) + "\n"
    (out / "summary.md").write_text(text)
    return pictures, text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m largebatch.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's --log-dir")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the PNGs and summary.md go (default RUN_DIR/report for a single run)",
    )
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated, one per RUN_DIR; equal labels are drawn as mean and min-max band",
    )
    p.add_argument(
        "--x",
        choices=["epoch", "step"],
        default=None,
        help="x axis (default: epoch when every run has finished one, else step)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        if len(args.runs) > 1:
            raise UsageError("--out DIR is required with several run directories")
        args.out = args.runs[0] / "report"
    if args.labels is not None:
        args.labels = [label.strip() for label in args.labels.split(",")]
        if len(args.labels) != len(args.runs) or not all(args.labels):
            raise UsageError(
                f"--labels needs one non-empty label per run directory ({len(args.runs)}), got {len(args.labels)}"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        labels = args.labels or [None] * len(args.runs)
        runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
        pictures, text = write_report(runs, args.out, args.x)
    except UsageError as e:
        print(f"python -m largebatch.report: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"wrote {len(pictures)} plots and summary.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
