"""Training throughput: our job on each engine against a minimal Horovod loop, same work, same run.

    .venv/bin/python bench/bench_train.py [--np 1,2] [--rounds 3] [--model resnet18]
        [--image-size 64] [--batch-size 32] [--steps 30] [--warmup-steps 10] [--threads 1]

Subjects, each started as a fresh ``mpirun -np N`` job per round:
  reference   bench/reference_train.py: torchvision model, SGD, hvd.DistributedOptimizer, no
              metrics, no logging, no checkpoints
  job         pytorch_imagenet_resnet.py --synthetic --engine horovod with the same model,
              optimizer (SGD, momentum 0.9, weight decay on every parameter), batch and
              processes: metrics reduced and logged to the console and TensorBoard every 10
              steps (its default)
  job torch   the same job on the torch engine (torch.distributed and DDP; under mpirun,
              rendezvous through mpi4py)
  job + ckpt  the Horovod job, also writing a full checkpoint (weights, momentum, RNG states)
              every 20 steps: one inside the measured window (an upper bound: real runs
              checkpoint every few thousand steps)

Both count images per second over all ranks from the end of step ``--warmup-steps`` to the
end of step ``--steps`` (the job: from the wall-clock times of its TensorBoard records at
those steps), so start-up, validation and the end-of-epoch checkpoint are outside. Each round
runs every subject once, back to back, in an order rotated from round to round; a round's
ratio compares runs made next to each other, which keeps the ratio stable when the machine is
shared. The table gives medians over the rounds. Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Siblings in bench/: `python bench/<script>.py` puts the script's own directory first on
# sys.path, so they import as top-level modules; largebatch and lars come from the install.
from machine import describe, load
from tables import train_table

from largebatch.events import read_scalars_timed

ROOT = Path(__file__).resolve().parents[1]

PRINT_FREQ = 10  # the job's default --print-freq
CHECKPOINT_EVERY = 20  # with the default steps, one checkpoint (at step 20) inside the measured window


def environment(threads: int) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def mpirun_command(np: int, script: Path, args: list) -> list[str]:
    # yield_when_idle: ranks waiting in MPI give their core away instead of spinning; on a node
    # with more busy threads than cores (this benchmark's 2-core machine at -np 2) spinning
    # halves the throughput of both subjects
    return [
        str(Path(sys.executable).with_name("mpirun")),
        "-np",
        str(np),
        "--oversubscribe",
        "--mca",
        "mpi_yield_when_idle",
        "1",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "PYTHONUNBUFFERED",
        sys.executable,
        str(script),
        *map(str, args),
    ]


def launch(np: int, script: Path, args: list, threads: int) -> str:
    cmd = mpirun_command(np, script, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(threads), cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def reference_rate(args, np: int) -> float:
    out = launch(
        np,
        ROOT / "bench" / "reference_train.py",
        [
            "--model",
            args.model,
            "--image-size",
            args.image_size,
            "--batch-size",
            args.batch_size,
            "--steps",
            args.steps,
            "--warmup-steps",
            args.warmup_steps,
        ],
        args.threads,
    )
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def job_rate(args, np: int, checkpoints: bool, engine: str = "horovod") -> float:
    with tempfile.TemporaryDirectory(dir=args.scratch) as run_dir:
        extra = ["--checkpoint-every", CHECKPOINT_EVERY] if checkpoints else []
        launch(
            np,
            ROOT / "pytorch_imagenet_resnet.py",
            [
                "--synthetic",
                "--synthetic-size",
                args.steps * args.batch_size * np,
                "--model",
                args.model,
                "--image-size",
                args.image_size,
                "--val-resize",
                args.image_size,
                "--batch-size",
                args.batch_size,
                "--val-batch-size",
                args.batch_size,
                "--epochs",
                1,
                "--warmup-epochs",
                0,
                "--base-op",
                "sgd",
                "--no-bn-bias-separately",
                "--label-smoothing",
                0,
                "--workers",
                0,
                "--print-freq",
                PRINT_FREQ,
                "--progress",
                "lines",
                "--log-dir",
                run_dir,
                "--engine",
                engine,
                *extra,
            ],
            args.threads,
        )
        times = {step: wall for step, _, wall in read_scalars_timed(Path(run_dir))["train/loss"]}
    images = (args.steps - args.warmup_steps) * args.batch_size * np
    return images / (times[args.steps] - times[args.warmup_steps])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", default="1,2", help="process counts to measure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--scratch", type=Path, default=None, help="where the job's run directories go (default: /tmp)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = p.parse_args(argv)
    if args.steps % PRINT_FREQ or args.warmup_steps % PRINT_FREQ or args.warmup_steps >= args.steps:
        p.error(
            f"--steps and --warmup-steps must be multiples of {PRINT_FREQ} (the job logs every "
            f"{PRINT_FREQ} steps), warmup below steps"
        )
    machine = describe()
    subjects = {
        "reference": lambda np: reference_rate(args, np),
        "job": lambda np: job_rate(args, np, checkpoints=False),
        "job torch": lambda np: job_rate(args, np, checkpoints=False, engine="torch"),
        "job + ckpt": lambda np: job_rate(args, np, checkpoints=True),
    }
    names = list(subjects)
    results = []
    for np in (int(n) for n in args.np.split(",")):
        rates: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(subjects[name](np))
                print(f"np {np} round {r + 1}/{args.rounds} {name}: {rates[name][-1]:.1f} images/s", file=sys.stderr)
            loads.append(load()[0])
        row = {
            "processes": np,
            "rates": {k: [round(x, 2) for x in v] for k, v in rates.items()},
            "median_images_per_sec": {k: round(statistics.median(v), 2) for k, v in rates.items()},
            "load_average_1min_after_each_round": loads,
        }
        for name in names[1:]:
            per_round = [s / b for s, b in zip(rates[name], rates["reference"])]
            row[f"{name} / reference"] = {
                "per_round": [round(x, 4) for x in per_round],
                "median": round(statistics.median(per_round), 4),
            }
        results.append(row)

    report = {
        "command": " ".join(["python bench/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": load()},
        "settings": {
            "model": args.model,
            "image_size": args.image_size,
            "batch_per_process": args.batch_size,
            "steps": args.steps,
            "measured_steps": args.steps - args.warmup_steps,
            "threads_per_process": args.threads,
            "rounds": args.rounds,
            "job_print_freq": PRINT_FREQ,
            "job_ckpt_checkpoint_every": CHECKPOINT_EVERY,
            "input": "synthetic (a pool of 4 random batches)",
            "optimizer": "SGD momentum 0.9, wd 5e-5",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(train_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
