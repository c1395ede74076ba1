"""Accuracy against global batch size, 1x to 64x the small batch, for SGD, LARS and LAMB, on
real data, through the real job. `make convergence` runs all of it (about an hour on 2 cores):

    .venv/bin/python bench/convergence.py                 # sweep, study, checks, report
    .venv/bin/python bench/convergence.py --stage sweep   # or study, checks, report (from the runs on disk)

Data: scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package), written
as 16-pixel JPEGs: 1,536 training images (batches of 8 to 512 divide it exactly) and 261
validation images. Model: ``cifar_resnet8`` (He et al.'s ResNet for small images, 78k
parameters), trained from scratch by the job (``largebatch.cli.main``, what
pytorch_imagenet_resnet.py runs) with polynomial warmup and decay (power 2, to 0), momentum 0.9,
weight decay 5e-5 (not on normalisation weights and biases), label smoothing 0.1 (the seed
trainer's default), LARS's eta 0.001.

Points: global batch 8k for k in 1, 4, 16, 32, 64 (SMALL = 8), for each optimizer, under two
budgets: the same epochs (EPOCHS for every batch: large batches take fewer steps) and the same
steps (STEPS for every batch, one epoch of the small batch: a batch of 8k trains k epochs).

Sweep (``--stage sweep``): every point's learning rate and warmup, chosen on a split of the
training set (1,024 images to train, 512 held out; the validation images are never used), with
one seed the study does not use (SWEEP_SEED), same epochs as the point (so 2/3 of its steps at
every batch size). Learning rates in factors of 2 around the scaling rule's guess (SGD: linear,
LARS and LAMB: square root, from BASE_LR at 1x), widened while the best is at an edge; then the
best rate with a longer warmup. The best is the highest final held-out top-1 (lower held-out loss
breaks ties). Written to bench/results/convergence_sweep.{json,md}.

Study (``--stage study``): every point with its chosen setting, SEEDS seeds (weights, data order,
augmentation all follow the seed), one process each, two at a time (fork from a parent that has
imported torch: the job's start-up costs seconds, the runs are short).

Checks (``--stage checks``): gradient accumulation (LARS, 16x and 64x as micro-batches of 8)
against the real large batch; and LARS's 16x point on the Horovod engine and on 2 processes
(mpirun, each engine) against the study's (torch engine, 1 process).

Report: mean, standard deviation and 95% confidence interval (t) per point; Welch's t-test of
each point against SGD at the small batch (same budget); the largest batch each optimizer holds
within one point. bench/results/convergence.{json,md,png}; the runs stay in runs/convergence/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy or torch start their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SMALL = 8
MULTIPLES = (1, 4, 16, 32, 64)
OPTIMIZERS = ("sgd", "lars", "lamb")
EPOCHS = 10  # the same-epochs budget
STEPS = 1536 // SMALL  # the same-steps budget: one epoch of the small batch
SEEDS = (1, 2, 3, 4, 5)
SWEEP_SEED = 100
BASE_LR = {"sgd": 0.05, "lars": 1.0, "lamb": 0.01}  # the sweep's centre at 1x
RULE = {"sgd": 1.0, "lars": 0.5, "lamb": 0.5}  # centre at kx: BASE_LR * k ** RULE
WARMUP, LONG_WARMUP = 0.1, 0.3  # fractions of the run's epochs
MAX_WIDEN = 2  # rates added beyond the first grid's edges
CHECK_ACCUMULATION = (16, 64)
CHECK_ENGINES = 16
COMMON = [
    "--model",
    "cifar_resnet8",
    "--image-size",
    "16",
    "--val-resize",
    "16",
    "--crop-scale",
    "0.5,1",
    "--val-batch-size",
    "512",
    "--lr-schedule",
    "poly",
    "--lr-power",
    "2",
    "--momentum",
    "0.9",
    "--wd",
    "5e-5",
    "--lars-eta",
    "0.001",
    "--bn-bias-separately",
    "--label-smoothing",
    "0.1",
    "--lr-scaling",
    "keep",
    "--workers",
    "0",
    "--progress",
    "lines",
    "--keep-checkpoints",
    "1",
    "--resume",
    "none",
]


@dataclass(frozen=True)
class Point:
    budget: str  # "epochs" or "steps"
    op: str
    k: int  # global batch = SMALL * k

    @property
    def batch(self) -> int:
        return SMALL * self.k

    @property
    def epochs(self) -> int:
        return EPOCHS if self.budget == "epochs" else self.k

    @property
    def name(self) -> str:
        return f"{self.budget}-{self.op}-{self.k}x"


@dataclass(frozen=True)
class Run:
    point: Point
    lr: float
    warmup: float  # fraction of the epochs
    seed: int
    data: str  # "study" or "sweep"
    np: int = 1
    engine: str = "torch"
    accumulate: int = 1

    @property
    def dir(self) -> str:
        extra = (f"-accumulate{self.accumulate}" if self.accumulate > 1 else "") + (
            f"-{self.engine}-np{self.np}" if (self.engine, self.np) != ("torch", 1) else ""
        )
        if self.data == "sweep":
            return f"sweep/{self.point.name}/lr{self.lr:g}-warmup{self.warmup:g}"
        return f"{self.data}/{self.point.name}{extra}/seed{self.seed}"

    def argv(self, data: Path, runs: Path) -> list[str]:
        train, val = (
            (data / "sweep-train", data / "sweep-holdout") if self.data == "sweep" else (data / "train", data / "val")
        )
        per_rank = self.point.batch // self.accumulate // self.np
        steps_per_epoch = 1536 // self.point.batch
        return [
            "--train-dir",
            str(train),
            "--val-dir",
            str(val),
            "--log-dir",
            str(runs / self.dir),
            *COMMON,
            "--engine",
            self.engine,
            "--base-op",
            self.point.op,
            "--base-lr",
            f"{self.lr:g}",
            "--batch-size",
            str(per_rank),
            "--batches-per-allreduce",
            str(self.accumulate),
            "--epochs",
            str(self.point.epochs),
            "--warmup-epochs",
            f"{self.warmup * self.point.epochs:g}",
            "--seed",
            str(self.seed),
            "--print-freq",
            str(max(1, steps_per_epoch * self.point.epochs // 4)),
        ]


def points() -> list[Point]:
    return [Point(b, op, k) for b in ("epochs", "steps") for op in OPTIMIZERS for k in MULTIPLES]


# --- data ------------------------------------------------------------------------------------


def write_data(data: Path) -> None:
    """train/ and val/ (the study), and sweep-train/ and sweep-holdout/: links into train/."""
    from largebatch.data.digits import write_digits

    if not (data / "train").is_dir():
        n_train, _ = write_digits(data, size=16, val_fraction=261 / 1797, seed=0)
        assert n_train == 1536, n_train
    if not (data / "sweep-holdout").is_dir():
        images = sorted((data / "train").glob("*/*.jpg"))
        held = set(random.Random(0).sample(range(len(images)), 512))
        for i, image in enumerate(images):
            link = data / ("sweep-holdout" if i in held else "sweep-train") / image.parent.name / image.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image)


# --- running ---------------------------------------------------------------------------------


def _child(argv: list[str], log: str) -> None:
    """A forked process: the job, as pytorch_imagenet_resnet.py runs it, its output in ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from largebatch.cli import main

    code = 1
    try:
        code = main("folder", argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(run: Run, data: Path, runs: Path) -> int:
    """One run from scratch; its exit code (3: stopped on a non-finite loss, see --max-nonfinite-steps)."""
    out = runs / run.dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "job.log"
    argv = run.argv(data, runs)
    if run.np == 1:
        process = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(log)))
        process.start()
        process.join()
        return process.exitcode
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = str(Path(sys.executable).with_name("mpirun"))
    cmd = [
        mpirun,
        "-np",
        str(run.np),
        "--oversubscribe",
        "-x",
        "OMP_NUM_THREADS",
        sys.executable,
        str(ROOT / "pytorch_imagenet_resnet.py"),
        *argv,
    ]
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def result(run: Run, runs: Path) -> dict | None:
    """Final validation (held-out, in the sweep) top-1 and loss; None when the run is not finished."""
    from largebatch.report import load_run

    out = runs / run.dir
    status = out / "status.json"
    if not status.is_file():
        return None
    state = json.loads(status.read_text()).get("state")
    if state not in ("finished", "failed"):
        return None
    r = load_run(out)
    top1, loss = r.last("val/top1"), r.last("val/loss")
    diverged = state == "failed" or top1 is None or not math.isfinite(loss or math.nan)
    return {
        "top1": 100.0 / 10 if diverged else top1,
        "loss": None if diverged else loss,
        "diverged": diverged,
        "seconds": round(r.seconds, 1),
    }


def run_all(plan: list[Run], data: Path, runs: Path, parallel: int) -> dict[Run, dict]:
    """Run what has no result on disk yet (so a stage can be continued), ``parallel`` at a time."""
    todo = [r for r in plan if result(r, runs) is None]
    todo.sort(key=lambda r: -r.point.epochs * (1 + 8 / r.point.k) * r.np)  # longest first
    done = 0

    def one(run: Run) -> None:
        nonlocal done
        code = launch(run, data, runs)
        if code not in (0, 3):
            raise SystemExit(f"run failed ({code}): see {runs / run.dir / 'job.log'}")
        done += 1
        r = result(run, runs)
        print(
            f"[{done}/{len(todo)}] {run.dir}: top-1 {r['top1']:.2f}{' (diverged)' if r['diverged'] else ''} "
            f"({r['seconds']:.0f} s)",
            flush=True,
        )

    singles, multi = [r for r in todo if r.np == 1], [r for r in todo if r.np > 1]
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, singles))
    for run in multi:  # each takes every core it is given
        one(run)
    return {r: result(r, runs) for r in plan}


# --- sweep -----------------------------------------------------------------------------------


def _lr(x: float) -> float:
    return float(f"{x:.4g}")


def _score(r: dict) -> tuple[float, float]:
    return (r["top1"], -(r["loss"] if r["loss"] is not None else math.inf))


def sweep(data: Path, runs: Path, parallel: int) -> dict[Point, dict]:
    """Each point's chosen learning rate and warmup, with every setting tried (see the docstring)."""
    grids = {p: [_lr(BASE_LR[p.op] * p.k ** RULE[p.op] * f) for f in (0.5, 1, 2)] for p in points()}
    widened = dict.fromkeys(grids, 0)
    while True:
        tried = run_all(
            [Run(p, lr, WARMUP, SWEEP_SEED, "sweep") for p, lrs in grids.items() for lr in lrs], data, runs, parallel
        )
        wider = False
        for p, lrs in grids.items():
            best = max(lrs, key=lambda lr: _score(tried[Run(p, lr, WARMUP, SWEEP_SEED, "sweep")]))
            if widened[p] < MAX_WIDEN and best in (min(lrs), max(lrs)):
                lrs.append(_lr(best / 2 if best == min(lrs) else best * 2))
                widened[p] += 1
                wider = True
        if not wider:
            break
    best_lr = {
        p: max(lrs, key=lambda lr: _score(tried[Run(p, lr, WARMUP, SWEEP_SEED, "sweep")])) for p, lrs in grids.items()
    }
    tried.update(
        run_all([Run(p, lr, LONG_WARMUP, SWEEP_SEED, "sweep") for p, lr in best_lr.items()], data, runs, parallel)
    )
    chosen = {}
    for p in grids:
        mine = {r: v for r, v in tried.items() if r.point == p}
        best = max(mine, key=lambda r: _score(mine[r]))
        chosen[p] = {
            "lr": best.lr,
            "warmup": best.warmup,
            "tried": [
                {"lr": r.lr, "warmup": r.warmup, **v}
                for r, v in sorted(mine.items(), key=lambda item: (item[0].warmup, item[0].lr))
            ],
        }
    return chosen


def study_plan(chosen: dict[Point, dict]) -> list[Run]:
    return [Run(p, chosen[p]["lr"], chosen[p]["warmup"], seed, "study") for p in points() for seed in SEEDS]


def checks_plan(chosen: dict[Point, dict]) -> dict[str, list[Run]]:
    """Label -> runs; each is compared with the study's runs of the same point."""
    plans = {}
    for k in CHECK_ACCUMULATION:
        p = Point("epochs", "lars", k)
        plans[f"accumulated {k} x {SMALL}"] = [
            Run(p, chosen[p]["lr"], chosen[p]["warmup"], seed, "study", accumulate=k) for seed in SEEDS
        ]
    p = Point("epochs", "lars", CHECK_ENGINES)
    for engine, np in (("horovod", 1), ("horovod", 2), ("torch", 2)):
        plans[f"{engine} engine, {np} process{'es' if np > 1 else ''}"] = [
            Run(p, chosen[p]["lr"], chosen[p]["warmup"], seed, "study", np=np, engine=engine) for seed in SEEDS
        ]
    return plans


def recalibrated(run: Run, data: Path, runs: Path) -> float:
    """Validation top-1 of a finished run's last checkpoint once its batch-norm running statistics
    are re-estimated over the training images (one pass of the validation transform, an exact
    average instead of momentum 0.1), the weights unchanged. A large batch takes few steps, and
    the running averages, updated once per step, trail the weights: this says how much of its
    loss is that lag rather than the weights themselves."""
    import torch
    from torchvision import datasets

    from largebatch import checkpoint
    from largebatch.config import parse_config
    from largebatch.data.folder import val_transform
    from largebatch.model import build_model

    cfg = parse_config(run.argv(data, runs), "folder")
    loader = lambda root: torch.utils.data.DataLoader(  # noqa: E731
        datasets.ImageFolder(str(root), val_transform(cfg)), batch_size=512
    )
    model = build_model(cfg.model.model, 10)
    model.load_state_dict(checkpoint.load(sorted((runs / run.dir).glob("checkpoint-*.pth.tar"))[-1])["model"])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    correct = 0
    with torch.no_grad():
        model.train()
        for images, _ in loader(cfg.data.train_dir):
            model(images)
        model.eval()
        for images, labels in loader(cfg.data.val_dir):
            correct += (model(images).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(loader(cfg.data.val_dir).dataset)


# --- statistics ------------------------------------------------------------------------------


def sample(values: list[float]) -> dict:
    """Mean, sample standard deviation and the t-based 95% confidence interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": values}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(a) - mean(b) (unequal variances): the difference, its 95%
    confidence interval and the two-sided p-value. Two constant samples have no spread to test:
    p is 1 when they are equal and 0 otherwise, and the interval is the difference itself."""
    from scipy import stats

    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(set(a)) == 1 and len(set(b)) == 1:
        return {"diff": diff, "ci95": [diff, diff], "p": 1.0 if diff == 0 else 0.0}
    test = stats.ttest_ind(a, b, equal_var=False)
    ci = test.confidence_interval(0.95)
    return {"diff": diff, "ci95": [float(ci.low), float(ci.high)], "p": float(test.pvalue)}


def holds(rows: list[dict], within: float = 1.0) -> dict:
    """Going through ``rows`` (of one optimizer and budget) in order, the last whose mean is
    within ``within`` points of the usual small-batch result (``vs_reference``: SGD at the small
    batch, same epochs) with every row before it also within, and the first that is not."""
    held = None
    for row in rows:
        if row["vs_reference"]["diff"] < -within:
            return {
                "k": held["k"] if held else None,
                "vs_reference": held["vs_reference"] if held else None,
                "first_outside": {"k": row["k"], "vs_reference": row["vs_reference"]},
            }
        held = row
    return {"k": held["k"], "vs_reference": held["vs_reference"], "first_outside": None}


# --- report ----------------------------------------------------------------------------------


def summarize(
    chosen: dict[Point, dict],
    results: dict[Run, dict],
    checks: dict[str, list[Run]],
    recalibrated_top1: dict[Run, float],
) -> dict:
    top1 = lambda plan: [results[r]["top1"] for r in plan]  # noqa: E731
    study = {
        p: [
            r
            for r in results
            if r.point == p and r.data == "study" and r.accumulate == 1 and (r.engine, r.np) == ("torch", 1)
        ]
        for p in points()
    }
    reference = top1(study[Point("epochs", "sgd", 1)])  # the usual small-batch training
    rows = []
    for p in points():
        small = top1(study[Point(p.budget, "sgd", 1)])
        rows.append(
            {
                "budget": p.budget,
                "op": p.op,
                "k": p.k,
                "batch": p.batch,
                "epochs": p.epochs,
                "steps": p.epochs * (1536 // p.batch),
                "lr": chosen[p]["lr"],
                "warmup": chosen[p]["warmup"],
                "top1": sample(top1(study[p])),
                "vs_small": welch(top1(study[p]), small),
                "vs_reference": welch(top1(study[p]), reference),
                "top1_bn_reestimated": sample([recalibrated_top1[r] for r in study[p]])
                if p.budget == "epochs"
                else None,
                "diverged": sum(results[r]["diverged"] for r in study[p]),
                "seconds_per_run": sum(results[r]["seconds"] for r in study[p]) / len(study[p]),
            }
        )
    # Same epochs: how far the batch grows before accuracy falls. Same steps: how large it must
    # be to catch up, in as many steps as 1 epoch of the small batch, with the usual result.
    held = {op: holds([r for r in rows if r["budget"] == "epochs" and r["op"] == op]) for op in OPTIMIZERS}
    reached = {op: holds([r for r in rows if r["budget"] == "steps" and r["op"] == op][::-1]) for op in OPTIMIZERS}
    check_rows = []
    for label, plan in checks.items():
        p = plan[0].point
        check_rows.append(
            {
                "check": label,
                "k": p.k,
                "top1": sample(top1(plan)),
                "study": sample(top1(study[p])),
                "vs_study": welch(top1(plan), top1(study[p])),
            }
        )
    return {"points": rows, "holds": held, "catches_up": reached, "checks": check_rows}


def _mean_std(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _diff(w: dict) -> str:
    return f"{w['diff']:+.2f} [{w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}]"


def markdown(summary: dict, seconds: dict) -> str:
    budgets = {
        "epochs": f"the same epochs ({EPOCHS} for every batch)",
        "steps": f"the same steps ({STEPS} for every batch: a batch of {SMALL}k trains k epochs)",
    }
    lines = [
        f"`cifar_resnet8` on the digits at 16 px (1,536 training, 261 validation images), global batch "
        f"{SMALL}k, seeds {', '.join(map(str, SEEDS))} per point; mean ± sample standard deviation of the "
        f"final validation top-1 (%), its 95% confidence interval (t), and the difference from SGD at batch "
        f"{SMALL} under the same budget with Welch's 95% interval and p-value. Learning rates and warmups "
        f"from the sweep on a split of the training set (convergence_sweep.md)."
    ]
    for budget, title in budgets.items():
        lines += [
            "",
            f"**Budget: {title}.**",
            "",
            "| optimizer | batch | steps | lr | warmup | top-1 | 95% CI | vs SGD at 8 [95% CI] | p "
            + (
                "| top-1, BN statistics re-estimated |"
                if budget == "epochs"
                else f"| vs SGD at 8, {EPOCHS} epochs | p |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if budget == "epochs" else " ---: | ---: |"),
        ]
        for r in (r for r in summary["points"] if r["budget"] == budget):
            diverged = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            lines.append(
                f"| {r['op'].upper()} | {r['batch']} ({r['k']}x) | {r['steps']} | {r['lr']:g} "
                f"| {r['warmup'] * r['epochs']:g} ep | {_mean_std(r['top1'])}{diverged} "
                f"| {r['top1']['ci95'][0]:.2f} - {r['top1']['ci95'][1]:.2f} | {_diff(r['vs_small'])} "
                f"| {r['vs_small']['p']:.3f} |"
                + (
                    f" {_mean_std(r['top1_bn_reestimated'])} |"
                    if budget == "epochs"
                    else f" {_diff(r['vs_reference'])} | {r['vs_reference']['p']:.3f} |"
                )
            )
        if budget == "epochs":
            lines += ["", "Largest batch within one point of SGD at 8 (every smaller batch too):", ""]
            found, none = summary["holds"], "none (already more than a point behind at 8)"
        else:
            lines += [
                "",
                f"Smallest batch within one point of SGD at 8 trained {EPOCHS} epochs (every larger batch too):",
                "",
            ]
            found, none = summary["catches_up"], "none"
        for op, h in found.items():
            text = f"{SMALL * h['k']} ({h['k']}x), difference {_diff(h['vs_reference'])}" if h["k"] else none
            if h["first_outside"]:
                f = h["first_outside"]
                text += f"; at {SMALL * f['k']} ({f['k']}x): {_diff(f['vs_reference'])}"
            lines.append(f"- {op.upper()}: {text}")
    lines += [
        "",
        "**Checks** (LARS, same epochs; each against the study's point: torch engine, 1 process, "
        "the real large batch):",
        "",
        "| check | batch | top-1 | study's point | difference [95% CI] | p |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in summary["checks"]:
        lines.append(
            f"| {c['check']} | {SMALL * c['k']} | {_mean_std(c['top1'])} | {_mean_std(c['study'])} "
            f"| {_diff(c['vs_study'])} | {c['vs_study']['p']:.3f} |"
        )
    lines += [
        "",
        "Time on this machine: "
        + ", ".join(f"{stage} {s / 60:.0f} min" for stage, s in seconds.items())
        + f" (total {sum(seconds.values()) / 60:.0f} min).",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, budget, title in zip(axes, ("epochs", "steps"), (f"same epochs ({EPOCHS})", f"same steps ({STEPS})")):
        for op, color in zip(OPTIMIZERS, ("tab:blue", "tab:orange", "tab:green")):
            rows = [r for r in summary["points"] if r["budget"] == budget and r["op"] == op]
            x = [r["batch"] for r in rows]
            mean = [r["top1"]["mean"] for r in rows]
            std = [r["top1"]["std"] for r in rows]
            ax.plot(x, mean, "o-", color=color, label=op.upper())
            ax.fill_between(
                x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.2
            )
        small = next(r for r in summary["points"] if r["budget"] == "epochs" and r["op"] == "sgd" and r["k"] == 1)
        ax.axhline(
            small["top1"]["mean"] - 1, color="grey", ls=":", lw=1, label=f"SGD at 8, {EPOCHS} epochs, minus 1 point"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks([SMALL * k for k in MULTIPLES], [str(SMALL * k) for k in MULTIPLES])
        ax.set_xlabel("global batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"final validation top-1 (%), mean ± std of {len(SEEDS)} seeds")
    axes[0].legend(loc="lower left")
    fig.suptitle("cifar_resnet8 on digits (16 px): accuracy against batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_markdown(chosen: dict[Point, dict]) -> str:
    lines = [
        f"Sweep: seed {SWEEP_SEED}, trained on 1,024 of the 1,536 training images, scored on the other 512 "
        f"(final top-1, then loss); warmup as a fraction of the run's epochs. The chosen setting is in bold.",
        "",
        "| point | batch | epochs | lr: held-out top-1 (warmup " + f"{WARMUP:g}) | longer warmup ({LONG_WARMUP:g}) |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for p, c in chosen.items():

        def cell(t, c=c):
            text = f"{t['lr']:g}: {'diverged' if t['diverged'] else format(t['top1'], '.1f')}"
            return f"**{text}**" if (t["lr"], t["warmup"]) == (c["lr"], c["warmup"]) else text

        short = ", ".join(cell(t) for t in c["tried"] if t["warmup"] == WARMUP)
        long = ", ".join(cell(t) for t in c["tried"] if t["warmup"] == LONG_WARMUP)
        lines.append(f"| {p.budget} {p.op.upper()} {p.k}x | {p.batch} | {p.epochs} | {short} | {long} |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stage",
        choices=["all", "sweep", "study", "checks", "report"],
        default="all",
        help="each stage runs what it needs of the ones before it; runs on disk are kept",
    )
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="single-process runs at a time")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "digits16-study")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "convergence")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    from machine import describe  # a sibling: `python bench/convergence.py` puts bench/ first on sys.path

    import largebatch.job  # noqa: F401  torch and the job's modules, once, before the runs fork

    write_data(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    times_file = args.runs / "seconds.json"
    seconds = json.loads(times_file.read_text()) if times_file.is_file() else {}

    def timed(stage: str, work):
        start = time.perf_counter()
        value = work()
        if args.stage in ("all", stage):
            seconds[stage] = seconds.get(stage, 0) + time.perf_counter() - start
            times_file.write_text(json.dumps(seconds))
        return value

    chosen = timed("sweep", lambda: sweep(args.data, args.runs, args.parallel))
    (args.out / "convergence_sweep.md").write_text(sweep_markdown(chosen))
    (args.out / "convergence_sweep.json").write_text(
        json.dumps(
            {
                "seed": SWEEP_SEED,
                "base_lr": BASE_LR,
                "rule_exponent": RULE,
                "warmups": [WARMUP, LONG_WARMUP],
                "points": [{"point": p.name, **c} for p, c in chosen.items()],
            },
            indent=1,
        )
        + "\n"
    )
    if args.stage == "sweep":
        return 0
    results = timed("study", lambda: run_all(study_plan(chosen), args.data, args.runs, args.parallel))
    checks = checks_plan(chosen)
    if args.stage in ("all", "checks", "report"):
        results.update(
            timed(
                "checks",
                lambda: run_all([r for plan in checks.values() for r in plan], args.data, args.runs, args.parallel),
            )
        )
    else:
        return 0
    cache = args.runs / "bn_reestimated.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    for r in study_plan(chosen):
        if r.point.budget == "epochs" and r.dir not in known:
            known[r.dir] = recalibrated(r, args.data, args.runs)
    cache.write_text(json.dumps(known))
    summary = summarize(chosen, results, checks, {r: known[r.dir] for r in study_plan(chosen) if r.dir in known})
    text = markdown(summary, {k: v for k, v in seconds.items() if k != "report"})
    (args.out / "convergence.md").write_text(text)
    (args.out / "convergence.json").write_text(
        json.dumps(
            {
                "command": "python bench/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": describe(),
                "seconds": seconds,
                "small_batch": SMALL,
                "multiples": MULTIPLES,
                "epochs": EPOCHS,
                "steps": STEPS,
                "seeds": SEEDS,
                "common_flags": COMMON,
                **summary,
            },
            indent=1,
        )
        + "\n"
    )
    plot(summary, args.out / "convergence.png")
    print(text, end="")
    print(f"wrote {args.out}/convergence.{{md,json,png}} and convergence_sweep.{{md,json}}; runs in {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
