"""Write scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package)
as an ImageFolder of RGB JPEGs: a real, small, learnable data set for the demo, the tests
and the convergence study, built offline.

    python -m largebatch.data.digits OUT_DIR [--size 32] [--val-fraction 0.2]

writes OUT_DIR/train/<digit>/*.jpg and OUT_DIR/val/<digit>/*.jpg.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(
    out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0, limit: int | None = None
) -> tuple[int, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))[:limit]
    n_val = int(round(len(order) * val_fraction))
    counts = {"train": 0, "val": 0}
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        folder = out / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=95)
        counts[split] += 1
    return counts["train"], counts["val"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.out / "train").is_dir():
        print(f"{args.out} exists; leaving it as it is")
        return 0
    n_train, n_val = write_digits(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {n_train} training and {n_val} validation images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
