"""Does large-batch training reach small-batch accuracy? A small study on real data.

    .venv/bin/python bench/convergence.py [--seeds 1,2,3] [--parallel 2] [--np 1]
    .venv/bin/python bench/convergence.py --sweep      # the learning-rate sweep behind the choices below
    .venv/bin/python bench/convergence.py --report-only  # tables and plots again, from the runs on disk

Data: scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package),
written as 32-pixel JPEGs: 1,536 training images (exactly 96 batches of 16 and 6 of 256, so
no configuration drops any) and 261 validation images. Model: torchvision's ResNet-18 (the
demo's), trained from scratch by the real job (``pytorch_imagenet_resnet.py``) for the same
number of epochs in every configuration, with linear warmup and polynomial decay (power 2,
to 0), momentum 0.9 and weight decay 5e-5 (not on normalisation weights and biases):

  a  small batch   SGD,  batch 16,  lr and warmup tuned (--sweep)
  b  large batch   SGD,  batch 256 (16x): a's recipe with 16 x a's lr (the linear scaling rule)
  c  large batch   LARS, batch 256, eta 0.001, lr and warmup tuned (--sweep)
  d  accumulation  c's recipe, batch 256 reached as 16 micro-batches of 16 (--batches-per-allreduce
                   16; batch norm then sees micro-batches of 16)

Each configuration runs once per seed (weights, data order and augmentation all follow the
seed). The report gives the mean, standard deviation and range of the final validation
top-1 per configuration, and plots the curves (``largebatch.report``). Writes
bench/results/convergence.{json,md,png}; the runs stay in runs/convergence/.

The sweep runs each (configuration, lr, warmup) of its grid once, with a seed (100) that the
study does not use, keeps runs that finished before (so it can be extended), and writes
bench/results/convergence_sweep.{json,md}. The study takes for a and c the setting with the
best final validation top-1 in the sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from largebatch import report

# Siblings in bench/: `python bench/<script>.py` puts the script's own directory first on
# sys.path, so they import as top-level modules; largebatch and lars come from the install.
from machine import describe

ROOT = Path(__file__).resolve().parents[1]

SMALL, LARGE = 16, 256
EPOCHS = 12
SWEEP_WARMUP = 2     # the sweep's warmup (epochs), unless a row says otherwise
# The study's settings, from the sweep (bench/results/convergence_sweep.md): each configuration
# gets the learning rate and warmup that gave its best final validation top-1 there.
LR_SGD_SMALL, WARMUP_SGD = 0.00625, 2
LR_LARS, WARMUP_LARS = 2.0, 1
SWEEP_SEED = 100
SMALL_LRS = (0.003125, 0.00625, 0.0125, 0.025, 0.05)
# (configuration, lr, warmup epochs): learning rates in factors of 2 around the best, SGD at
# the large batch at 16x each small-batch rate; then LARS's warmup varied at its best rate, and
# the shorter warmup that LARS preferred tried for all three around their best rates
SWEEP = ([("a-sgd-small", lr, SWEEP_WARMUP) for lr in SMALL_LRS]
         + [("b-sgd-large", 16 * lr, SWEEP_WARMUP) for lr in SMALL_LRS]
         + [("c-lars-large", lr, SWEEP_WARMUP) for lr in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)]
         + [("c-lars-large", 2.0, warmup) for warmup in (1, 4)]
         + [("a-sgd-small", 0.00625, 1), ("b-sgd-large", 0.1, 1), ("c-lars-large", 1.0, 1), ("c-lars-large", 4.0, 1)])
COMMON = ["--model", "resnet18", "--image-size", "32", "--crop-scale", "0.5,1", "--val-batch-size", "128",
          "--lr-schedule", "poly", "--lr-power", "2", "--momentum", "0.9", "--wd", "5e-5",
          "--lr-scaling", "keep", "--workers", "1", "--progress", "lines",
          # the defaults these results were measured with (the original trainer's differ)
          "--bn-bias-separately", "--label-smoothing", "0"]


def configurations() -> dict[str, dict]:
    """name -> global batch, micro-batches per step, optimizer, learning rate, warmup epochs."""
    return {
        "a-sgd-small": dict(batch=SMALL, accumulate=1, op="sgd", lr=LR_SGD_SMALL, warmup=WARMUP_SGD),
        # the linear scaling rule applied to a's recipe
        "b-sgd-large": dict(batch=LARGE, accumulate=1, op="sgd", lr=LR_SGD_SMALL * LARGE / SMALL, warmup=WARMUP_SGD),
        "c-lars-large": dict(batch=LARGE, accumulate=1, op="lars", lr=LR_LARS, warmup=WARMUP_LARS),
        "d-lars-accumulated": dict(batch=LARGE, accumulate=LARGE // SMALL, op="lars", lr=LR_LARS, warmup=WARMUP_LARS),
    }


def job_args(conf: dict, data: Path, run_dir: Path, seed: int, epochs: int, np: int) -> list[str]:
    micro = conf["batch"] // conf["accumulate"]  # global micro-batch, split over the processes
    steps_per_epoch = 1536 // conf["batch"]
    return ["--train-dir", data / "train", "--val-dir", data / "val", "--log-dir", run_dir, *COMMON,
            "--batch-size", micro // np, "--batches-per-allreduce", conf["accumulate"],
            "--base-op", conf["op"], "--base-lr", conf["lr"], "--epochs", epochs, "--warmup-epochs", conf["warmup"],
            "--seed", seed, "--print-freq", max(1, steps_per_epoch // 3), "--resume", "none"]


def run_job(args: list, np: int, threads: int, log: Path) -> float:
    """One training run from scratch; returns its wall time. Output goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    python = sys.executable
    script = [python, str(ROOT / "pytorch_imagenet_resnet.py"), *map(str, args)]
    cmd = script if np == 1 else [str(Path(python).with_name("mpirun")), "-np", str(np), "--oversubscribe",
                                  "-x", "OMP_NUM_THREADS", *script]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({proc.returncode}), see {log}:\n" + log.read_text()[-2000:])
    return time.perf_counter() - start


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def run_all(plan: list[tuple[str, int, list]], np: int, parallel: int, reuse: bool = False) -> None:
    """Run (label, seed, args) jobs, ``parallel`` at a time, each on its share of the cores;
    with ``reuse``, runs that finished before are kept as they are."""
    threads = max(1, (os.cpu_count() or 1) // (parallel * np))
    done = 0

    def one(item):
        nonlocal done
        label, seed, args = item
        run_dir = Path(args[args.index("--log-dir") + 1])
        if reuse and finished(run_dir):
            done += 1
            print(f"[{done}/{len(plan)}] {label} seed {seed}: finished before, kept", flush=True)
            return
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a study run always starts from scratch
        run_dir.mkdir(parents=True)
        seconds = run_job(args, np, threads, run_dir / "job.log")
        done += 1
        top1 = report.load_run(run_dir).last("val/top1")
        print(f"[{done}/{len(plan)}] {label} seed {seed}: val top-1 {top1:.2f} ({seconds:.0f} s)", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, plan))


def write_digits_split(data: Path) -> None:
    from largebatch.data.digits import write_digits
    if not (data / "train").is_dir():
        n_train, n_val = write_digits(data, size=32, val_fraction=261 / 1797, seed=0)
        assert n_train == 1536, n_train


def study(args, confs: dict[str, dict], run_root: Path) -> dict:
    runs = [report.load_run(run_root / name / f"seed{seed}", name) for name in confs for seed in args.seeds]
    summaries = [report.summarize(r) for r in runs]
    groups = {g["label"]: g for g in report.summarize_groups(summaries)}
    small = groups["a-sgd-small"]["final_val_top1_mean"]
    for g in groups.values():
        g["gap_to_small_batch"] = g["final_val_top1_mean"] - small
    report.plot(runs, (report.Panel("validation top-1 (%)", (report.Series("val/top1", ""),)),
                       report.Panel("training loss", (report.Series("train/loss", ""),), log=True),
                       report.Panel("learning rate", (report.Series("train/lr", ""),), log=True)),
                args.out / "convergence.png", x="epoch",
                title=f"ResNet-18 on digits, {args.epochs} epochs, seeds {','.join(map(str, args.seeds))} "
                      f"(mean, band: min-max)")
    report.write_report(runs, run_root / "report", x="epoch")  # every figure, every run
    return {"summaries": summaries, "groups": list(groups.values())}


def sweep_dir(run_root: Path, name: str, lr: float, warmup: float) -> Path:
    return run_root / "sweep" / (f"{name}-lr{lr:g}" + (f"-warmup{warmup:g}" if warmup != SWEEP_WARMUP else ""))


def sweep_results(run_root: Path) -> list[dict]:
    rows = []
    for name, lr, warmup in SWEEP:
        run = report.load_run(sweep_dir(run_root, name, lr, warmup), name)
        s = report.summarize(run)
        rows.append({"config": name, "lr": lr, "warmup_epochs": warmup, "final_val_top1": s["final_val_top1"],
                     "final_val_loss": run.last("val/loss"), "best_val_top1": s["best_val_top1"],
                     "final_train_loss": s["final_train_loss"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, one run per configuration each")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--np", type=int, default=1, help="processes per run (mpirun -np when above 1)")
    p.add_argument("--parallel", type=int, default=2,
                   help="runs at a time; each gets cores / (parallel x np) threads")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "digits-study")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "convergence")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead of the study")
    p.add_argument("--report-only", action="store_true", help="no training: report the runs on disk")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if SMALL % args.np or LARGE % args.np:
        p.error(f"--np must divide the batch sizes {SMALL} and {LARGE}")
    write_digits_split(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    machine = describe()

    if args.sweep:
        plan = []
        for name, lr, warmup in SWEEP:
            conf = dict(configurations()[name], lr=lr, warmup=warmup)
            plan.append((f"{name} lr {lr:g} warmup {warmup:g}", SWEEP_SEED,
                         job_args(conf, args.data, sweep_dir(args.runs, name, lr, warmup), SWEEP_SEED,
                                  args.epochs, args.np)))
        if not args.report_only:
            run_all(plan, args.np, args.parallel, reuse=True)  # a sweep can be continued
        rows = sweep_results(args.runs)
        table = ["| configuration | lr | warmup epochs | final val top-1 | final val loss | best val top-1 "
                 "| final train loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        table += [f"| {r['config']} | {r['lr']:g} | {r['warmup_epochs']:g} | {r['final_val_top1']:.2f} "
                  f"| {r['final_val_loss']:.4f} | {r['best_val_top1']:.2f} | {r['final_train_loss']:.4f} |"
                  for r in rows]
        text = "\n".join(table) + "\n"
        (args.out / "convergence_sweep.json").write_text(json.dumps(
            {"command": " ".join(["python bench/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
             "seed": SWEEP_SEED, "epochs": args.epochs, "machine": machine,
             "results": rows, "seconds": round(time.perf_counter() - start)}, indent=1) + "\n")
        (args.out / "convergence_sweep.md").write_text(text)
        print(text, end="")
        return 0

    confs = configurations()
    if not args.report_only:
        plan = [(name, seed, job_args(conf, args.data, args.runs / name / f"seed{seed}", seed, args.epochs, args.np))
                for seed in args.seeds for name, conf in confs.items()]
        # the longest runs (many small steps) first, so the parallel slots finish together
        plan.sort(key=lambda item: confs[item[0]]["batch"] // confs[item[0]]["accumulate"])
        run_all(plan, args.np, args.parallel)
    results = study(args, confs, args.runs)
    lines = [f"ResNet-18, digits at 32 px (1,536 train / 261 validation images), {args.epochs} epochs "
             f"(poly decay, power 2), {args.np} process(es) per run, seeds {', '.join(map(str, args.seeds))}; "
             f"std: sample standard deviation over the seeds.", "",
             "| configuration | global batch | optimizer, lr, warmup epochs | final val top-1, mean ± std | min - max "
             "| vs small batch | best val top-1, mean | time per run |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for g in results["groups"]:
        c = confs[g["label"]]
        batch = f"{c['batch']}" + (f" ({c['accumulate']} x {c['batch'] // c['accumulate']})" if c["accumulate"] > 1 else "")
        lines.append(f"| {g['label']} | {batch} | {c['op'].upper()}, {c['lr']:g}, {c['warmup']:g} "
                     f"| {g['final_val_top1_mean']:.2f} ± {g['final_val_top1_std']:.2f} "
                     f"| {g['final_val_top1_min']:.2f} - {g['final_val_top1_max']:.2f} "
                     f"| {g['gap_to_small_batch']:+.2f} | {g['best_val_top1_mean']:.2f} "
                     f"| {report.duration(g['seconds_mean'])} |")
    text = "\n".join(lines) + "\n"
    (args.out / "convergence.md").write_text(text)
    record = {"command": " ".join(["python bench/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine, "seconds": round(time.perf_counter() - start)}
    if args.report_only and (args.out / "convergence.json").is_file():  # keep what the training run recorded
        previous = json.loads((args.out / "convergence.json").read_text())
        record = {key: previous.get(key, value) for key, value in record.items()}
    (args.out / "convergence.json").write_text(json.dumps({
        **record, "epochs": args.epochs, "np": args.np, "seeds": args.seeds,
        "common_flags": COMMON, "configurations": confs, **results}, indent=1, default=str) + "\n")
    print(text, end="")
    print(f"wrote {args.out / 'convergence.md'}, convergence.json, convergence.png; runs in {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
