"""ResNet-50 training throughput on one GPU, by precision and input, beside published figures.

    .venv/bin/python bench/bench_gpu.py [--batch-size 256] [--steps 120] [--warmup-steps 40]
        [--rounds 2] [--peak-tflops T]
    .venv/bin/python bench/bench_gpu.py --smoke   # on a CPU: checks this script's paths, tiny sizes

Rows: our job (``pytorch_imagenet_resnet.py`` / ``pytorch_imagenet_resnet_dali.py``), one
process, ResNet-50 at 224 px, ``--channels-last``, for ``--precision fp32`` (cuDNN may use TF32
for convolutions, PyTorch's default), ``amp`` (autocast fp16 with dynamic loss scaling) and
``amp-bf16`` (autocast bf16), each with synthetic input and with DALI input (JPEGs decoded
on the GPU, ``--dali-device gpu``; a folder of ImageNet-sized photos, the same few thousand
files linked many times over, so the files are read from the page cache). Images per second
are counted from the end of step ``--warmup-steps`` to the end of step ``--steps`` from the
job's TensorBoard records, so start-up and cuDNN's autotuning are outside. Median over
``--rounds`` runs. Writes bench/results/gpu.json.

Published anchors printed beside the table:
  NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100 80GB, AMP: 2,470 images/s
  MLPerf Training, ResNet-50 on H100 systems: about 7,160 images/s per GPU
  arithmetic limit: about 24.6 GFLOP per training image (3 x 4.1 GMAC x 2), so about 40.7
  images/s per dense TFLOP/s of the GPU's peak for that precision

Without a CUDA GPU (and without --smoke) it prints why and exits 0, so ``make bench`` can
call it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# Siblings in bench/: `python bench/<script>.py` puts the script's own directory first on
# sys.path, so they import as top-level modules; largebatch and lars come from the install.
from bench_train import launch
from machine import describe, load

from largebatch.events import read_scalars_timed

ROOT = Path(__file__).resolve().parents[1]

GFLOP_PER_IMAGE = 24.6  # forward + backward of ResNet-50 at 224 px
ANCHORS = [
    ("NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100 80GB, AMP", 2470),
    ("MLPerf Training, ResNet-50, H100 systems, per GPU", 7160),
]
# Dense peaks in TFLOP/s: (fp16/bf16 tensor cores, TF32 tensor cores), from NVIDIA's data sheets.
PEAKS = [
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("H100", (989.4, 494.7)),
    ("H200", (989.4, 494.7)),
    ("GH200", (989.4, 494.7)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("A10", (125.0, 62.5)),
    ("V100", (125.0, 15.7)),
]
PRECISIONS = ["fp32", "amp", "amp-bf16"]
PRINT_FREQ = 10


def peaks_for(gpu: str | None) -> tuple[float, float] | None:
    for name, peak in PEAKS:
        if gpu and name.lower() in gpu.lower():
            return peak
    return None


def make_folder(root: Path, distinct: int, train: int, classes: int = 10, seed: int = 0) -> None:
    """ImageNet-like JPEGs (crops of scikit-learn's sample photos, shorter side 256-400 px):
    ``distinct`` files, hard-linked over and over into ``train`` training images, and once
    each into the validation set."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    source = root / "distinct"
    source.mkdir(parents=True)
    files = []
    for i in range(distinct):
        photo = photos[i % len(photos)]
        w, h = int(photo.width * rng.uniform(0.5, 1.0)), int(photo.height * rng.uniform(0.5, 1.0))
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        scale = rng.integers(256, 401) / min(w, h)
        image = photo.crop((x, y, x + w, y + h)).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        files.append(source / f"{i:05d}.jpg")
        image.save(files[-1], quality=90)
    for split, count in (("train", train), ("val", distinct)):
        for k in range(count):
            i = k % distinct
            folder = root / "data" / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(files[i], folder / f"{k // distinct:03d}-{files[i].name}")


def job_rate(args, precision: str, data: Path | None, scratch: Path) -> float:
    common = [
        "--model",
        args.model,
        "--image-size",
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
        "--bn-bias-separately",
        "--label-smoothing",
        0,
        "--precision",
        precision,
        "--channels-last",
        "--print-freq",
        PRINT_FREQ,
        "--progress",
        "lines",
    ]
    with tempfile.TemporaryDirectory(dir=scratch) as run_dir:
        if data is None:
            script = ROOT / "pytorch_imagenet_resnet.py"
            extra = ["--synthetic", "--synthetic-size", args.steps * args.batch_size, "--workers", 0]
        else:
            script = ROOT / "pytorch_imagenet_resnet_dali.py"
            extra = ["--data-dir", data, "--data-format", "folder", "--dali-device", "cpu" if args.smoke else "gpu"]
        launch(1, script, [*common, *extra, "--log-dir", run_dir], args.threads)
        times = {step: wall for step, _, wall in read_scalars_timed(Path(run_dir))["train/loss"]}
    return (args.steps - args.warmup_steps) * args.batch_size / (times[args.steps] - times[args.warmup_steps])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="OMP_NUM_THREADS")
    p.add_argument("--distinct-images", type=int, default=2048, help="distinct JPEGs behind the DALI rows")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense fp16/bf16 peak of this GPU (default: looked up by name; TF32 taken as half)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="on a CPU: resnet18, 32 px, a few steps, fp32 and amp-bf16, DALI on the CPU; "
        "checks that the script runs, the numbers mean nothing",
    )
    p.add_argument("--out", type=Path, default=None, help="default bench/results/gpu.json (smoke: not written)")
    args = p.parse_args(argv)
    precisions = PRECISIONS
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.steps, args.warmup_steps = "resnet18", 32, 16, 20, 10
        args.rounds, args.distinct_images = 1, 64
        precisions = ["fp32", "amp-bf16"]  # fp16 needs a GPU
    elif not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU visible; skipped (run `python bench/bench_gpu.py` on a GPU machine)")
        return 0
    if args.steps % PRINT_FREQ or args.warmup_steps % PRINT_FREQ or args.warmup_steps >= args.steps:
        p.error(f"--steps and --warmup-steps must be multiples of {PRINT_FREQ}, warmup below steps")
    machine = describe()
    gpu = machine["gpu"]
    peak16, peak32 = (args.peak_tflops, args.peak_tflops / 2) if args.peak_tflops else peaks_for(gpu) or (None, None)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # one epoch is exactly --steps batches
        make_folder(tmp / "images", args.distinct_images, args.steps * args.batch_size)
        data = tmp / "images" / "data"
        for precision in precisions:
            for source in ("synthetic", "DALI"):
                rates = []
                for r in range(args.rounds):
                    rates.append(job_rate(args, precision, None if source == "synthetic" else data, tmp))
                    print(
                        f"{precision} {source} round {r + 1}/{args.rounds}: {rates[-1]:.1f} images/s", file=sys.stderr
                    )
                peak = peak32 if precision == "fp32" else peak16
                limit = peak * 1000 / GFLOP_PER_IMAGE if peak else None
                median = statistics.median(rates)
                rows.append(
                    {
                        "precision": precision,
                        "input": source,
                        "images_per_sec": round(median, 1),
                        "rounds": [round(x, 1) for x in rates],
                        "arithmetic_limit": round(limit) if limit else None,
                        "fraction_of_limit": round(median / limit, 3) if limit else None,
                        "vs_nvidia_a100_amp": round(median / ANCHORS[0][1], 3),
                        "vs_mlperf_h100": round(median / ANCHORS[1][1], 3),
                    }
                )

    report = {
        "command": " ".join(["python bench/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": load()},
        "settings": {
            "model": args.model,
            "image_size": args.image_size,
            "batch": args.batch_size,
            "channels_last": True,
            "processes": 1,
            "steps": args.steps,
            "measured_steps": args.steps - args.warmup_steps,
            "rounds": args.rounds,
            "peak_tflops_fp16_bf16": peak16,
            "peak_tflops_tf32": peak32,
            "gflop_per_training_image": GFLOP_PER_IMAGE,
            "smoke": args.smoke,
        },
        "anchors": [{"source": s, "images_per_sec": v} for s, v in ANCHORS],
        "results": rows,
    }
    out = args.out or (None if args.smoke else ROOT / "bench" / "results" / "gpu.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{args.model} training on {gpu or 'CPU (smoke test)'}, {args.image_size} px, batch {args.batch_size}, "
        f"channels-last, 1 process; median of {args.rounds} run(s)"
    )
    print()
    print(
        "| precision | input | images/s | arithmetic limit | of the limit | vs NVIDIA A100 AMP (2,470) "
        "| vs MLPerf H100 (7,160) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        limit = f"{row['arithmetic_limit']:,}" if row["arithmetic_limit"] else "-"
        share = f"{100 * row['fraction_of_limit']:.1f}%" if row["fraction_of_limit"] else "-"
        print(
            f"| {row['precision']} | {row['input']} | {row['images_per_sec']:,.1f} | {limit} | {share} "
            f"| {row['vs_nvidia_a100_amp']:.2f}x | {row['vs_mlperf_h100']:.2f}x |"
        )
    print()
    print(
        f"arithmetic limit: dense peak ({peak16 or '?'} TFLOP/s fp16/bf16, {peak32 or '?'} TF32) "
        f"x 1e12 / {GFLOP_PER_IMAGE}e9 FLOP per image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
