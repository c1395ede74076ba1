"""One whole epoch, end to end: our job against Horovod's ImageNet example as it runs on a CPU.

    .venv/bin/python bench/bench_epoch.py [--np 2] [--rounds 3] [--model resnet50] [--images 64]
        [--workers 4,0] [--engines horovod,torch]

Data: ``--images`` random-noise JPEGs of 256 px in 4 classes (and a quarter as many for
validation), written once into a temporary folder. Subjects, each a fresh ``mpirun -np N``
per round, in an order rotated from round to round:

  reference     bench/reference_epoch.py: what the example does per epoch (loader in the
                training process, per-step metric allreduce, validation, torch.save, TensorBoard,
                four threads per rank)
  job           pytorch_imagenet_resnet.py with the same model, optimizer, batch and threads,
                one epoch, once per --workers value and per engine

The figure is the whole process's wall time, from the launch to the launcher's exit, and the
ratio is reference time / job time (above 1: the job is faster). Each subject's phases are
timed from the lines it prints as they arrive, so their edges differ a little: the
reference's start-up includes building its model and ends at its first step; the job's
ends at its banner, so the job's "train" also holds building the model, the start-up
broadcast and the checkpoint lookup; the job writes its epoch-end checkpoint before it
prints the validation line, so its "validate" holds the checkpoint, and its "checkpoint"
is only the final report; the reference's torch.save is in its "exit". Writes
bench/results/epoch.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import environment, mpirun_command
from machine import describe, load
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
THREADS = 4  # the example's torch.set_num_threads(4)


def write_images(root: Path, count: int, classes: int = 4, size: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(classes, count // 4))):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def timed_run(np_: int, script: Path, args: list, marks: dict[str, str]) -> dict:
    """Run under mpirun; seconds spent in each phase, one per mark (in order): from the previous
    mark's first line (or the launch) to the first line containing this one; "exit" to the end."""
    cmd = mpirun_command(np_, script, args)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(THREADS), cwd=ROOT
    )
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for name, mark in marks.items():
            if name not in seen and mark in line:
                seen[name] = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(lines)[-3000:]}")
    seen["exit"] = time.perf_counter() - start
    missing = [name for name in marks if name not in seen]
    if missing:
        raise SystemExit(f"never printed {missing}: {' '.join(cmd)}\n{''.join(lines)[-3000:]}")
    out, previous = {}, 0.0
    for name in [*marks, "exit"]:
        out[name] = round(seen[name] - previous, 2)
        previous = seen[name]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--images", type=int, default=64, help="training JPEGs (validation: a quarter as many)")
    p.add_argument("--workers", default="4,0", help="the job's --workers values to measure (4: its default)")
    p.add_argument("--engines", default="horovod,torch")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "epoch.json")
    args = p.parse_args(argv)
    machine = describe()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_images(data, args.images)
        common = [
            "--train-dir",
            data / "train",
            "--val-dir",
            data / "val",
            "--model",
            args.model,
            "--image-size",
            args.image_size,
            "--batch-size",
            args.batch_size,
            "--val-batch-size",
            args.batch_size,
        ]

        steps = args.images // (args.batch_size * args.np)

        def reference(run_dir: Path) -> dict:
            return timed_run(
                args.np,
                ROOT / "bench" / "reference_epoch.py",
                [*common, "--log-dir", run_dir, "--threads", THREADS],
                {"start-up": "phase train", "train": "phase validate", "validate": "phase checkpoint"},
            )

        def job(engine: str, workers: int):
            def run(run_dir: Path) -> dict:
                return timed_run(
                    args.np,
                    ROOT / "pytorch_imagenet_resnet.py",
                    [
                        *common,
                        "--log-dir",
                        run_dir,
                        "--epochs",
                        1,
                        "--warmup-epochs",
                        0,
                        "--base-op",
                        "sgd",
                        "--no-bn-bias-separately",
                        "--label-smoothing",
                        0,
                        "--base-lr",
                        0.0125,
                        "--lr-scaling",
                        "linear",
                        "--wd",
                        5e-5,
                        "--workers",
                        workers,
                        "--progress",
                        "lines",
                        "--engine",
                        engine,
                    ],
                    {
                        "start-up": "process(es),",
                        "train": f"step {steps}/{steps}",
                        "validate": "epoch 1/1: val",
                        "checkpoint": "finished:",
                    },
                )

            return run

        subjects = {"reference": reference}
        for engine in args.engines.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                subjects[f"job {engine}, --workers {workers}"] = job(engine, workers)
        names = list(subjects)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
                    runs[name].append(subjects[name](Path(run_dir)))
                print(
                    f"round {r + 1}/{args.rounds} {name}: {sum(runs[name][-1].values()):.1f} s {runs[name][-1]}",
                    file=sys.stderr,
                    flush=True,
                )

    def median_phases(rows):
        return {k: round(statistics.median(row[k] for row in rows), 2) for k in rows[0]}

    totals = {name: [round(sum(row.values()), 2) for row in rows] for name, rows in runs.items()}
    results = {
        name: {
            "seconds": totals[name],
            "median_seconds": round(statistics.median(totals[name]), 2),
            "median_phases": median_phases(runs[name]),
            "speed_vs_reference": round(
                statistics.median([ref / own for ref, own in zip(totals["reference"], totals[name])]), 3
            ),
        }
        for name in names
    }
    report = {
        "command": " ".join(["python bench/bench_epoch.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": load()},
        "settings": {
            "processes": args.np,
            "model": args.model,
            "image_size": args.image_size,
            "batch_per_process": args.batch_size,
            "train_images": args.images,
            "threads_per_process": THREADS,
            "rounds": args.rounds,
            "steps": steps,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{args.model} at {args.image_size} px, {args.images} JPEGs, {args.np} processes, one epoch, "
        f"whole-process wall time; median of {args.rounds} interleaved rounds.\n"
    )
    print("| subject | seconds | reference / this | phases (s) |\n| --- | ---: | ---: | --- |")
    for name, row in results.items():
        print(
            f"| {name} | {row['median_seconds']:.1f} | {row['speed_vs_reference']:.3f} | "
            + ", ".join(f"{k} {v:.1f}" for k, v in row["median_phases"].items())
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
