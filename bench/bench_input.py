"""Input pipeline throughput: DALI (CPU) against the torchvision DataLoader path, same run.

    .venv/bin/python bench/bench_input.py [--images 1024] [--workers 2] [--rounds 3]

Both sides read the same JPEGs (photo-sized crops of scikit-learn's two sample photos,
shorter side 256-400 px, as ImageNet's) with the same augmentation (random resized crop to
224, flip, normalisation) at batch 64, with the same parallelism: ``--workers`` DataLoader
processes for torchvision, ``--dali-threads`` of the same number for DALI. Rows: torchvision
(largebatch.data.folder.FolderInput), DALI reading the image folder, DALI reading the
same images converted to TFRecords, and, where a GPU is present, DALI decoding on it.

Each round runs one training epoch per row, in turn, and counts images per second from the
first batch on (pipeline start-up left out: ImageNet epochs are long); the table gives each
row's median over the rounds and its ratio to torchvision's median. Writes
bench/results/input.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from largebatch.config import parse_config
from largebatch.data.dali import DaliInput
from largebatch.data.folder import FolderInput
from largebatch.data.tfrecord import convert

ROOT = Path(__file__).resolve().parents[1]

BATCH = 64


def make_images(root: Path, n_train: int, n_val: int, classes: int = 8, seed: int = 0) -> None:
    """Random crops of the two sample photos, resized to ImageNet-like sizes, as JPEGs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            photo = photos[i % len(photos)]
            w = int(photo.width * rng.uniform(0.5, 1.0))
            h = int(photo.height * rng.uniform(0.5, 1.0))
            x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
            short = rng.integers(256, 401)
            scale = short / min(w, h)
            image = photo.crop((x, y, x + w, y + h)).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.jpg", quality=90)


def epoch_rate(data, epoch: int) -> float:
    """Images per second over one training epoch, from the first batch on."""
    batches = data.train(epoch)
    next(batches)
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="training images (one epoch per round and row)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "input.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the main process only collects batches; the workers do the work

    with tempfile.TemporaryDirectory() as tmp:
        images, records = Path(tmp) / "images", Path(tmp) / "records"
        make_images(images, args.images, BATCH)
        convert(images, records, shard_size=256, workers=args.workers)
        common = [
            "--image-size",
            "224",
            "--batch-size",
            str(BATCH),
            "--val-batch-size",
            str(BATCH),
            "--model",
            "resnet50",
        ]
        dali = ["--dali-threads", str(args.workers), *common]
        cpu = torch.device("cpu")
        rows = {
            "torchvision DataLoader (folder)": FolderInput(
                parse_config(
                    [
                        "--train-dir",
                        str(images / "train"),
                        "--val-dir",
                        str(images / "val"),
                        "--workers",
                        str(args.workers),
                        *common,
                    ]
                ),
                0,
                1,
                cpu,
            ),
            "DALI CPU (folder)": DaliInput(
                parse_config(
                    ["--data-dir", str(images), "--data-format", "folder", "--dali-device", "cpu", *dali], "dali"
                ),
                0,
                1,
                cpu,
            ),
            "DALI CPU (TFRecord)": DaliInput(
                parse_config(["--data-dir", str(records), "--dali-device", "cpu", *dali], "dali"), 0, 1, cpu
            ),
        }
        if torch.cuda.is_available():
            gpu = torch.device("cuda", 0)
            rows["DALI GPU (TFRecord)"] = DaliInput(
                parse_config(["--data-dir", str(records), "--dali-device", "gpu", *dali], "dali"), 0, 1, gpu
            )
        rates: dict[str, list[float]] = {name: [] for name in rows}
        for r in range(args.rounds):
            for name, data in rows.items():
                rates[name].append(epoch_rate(data, r))
                print(f"round {r + 1}/{args.rounds} {name}: {rates[name][-1]:.1f} images/s", file=sys.stderr)

    baseline = statistics.median(rates["torchvision DataLoader (folder)"])
    results = [
        {
            "pipeline": name,
            "images_per_s": round(statistics.median(v), 1),
            "ratio_vs_torchvision": round(statistics.median(v) / baseline, 2),
            "rounds": [round(x, 1) for x in v],
        }
        for name, v in rates.items()
    ]
    report = {
        "command": "python bench/bench_input.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": {
            "train_images": args.images,
            "batch": BATCH,
            "crop": 224,
            "workers_or_threads": args.workers,
            "rounds": args.rounds,
            "rate": "training epoch, from the first batch on; median over rounds",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"| pipeline ({args.workers} workers/threads, batch {BATCH}, 224 px) | images/s | vs torchvision |")
    print("| --- | ---: | ---: |")
    for row in results:
        print(f"| {row['pipeline']} | {row['images_per_s']:.1f} | {row['ratio_vs_torchvision']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
