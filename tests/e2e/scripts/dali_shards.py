"""Under mpirun -np 2: DaliInput's sharding, for TFRecords and for an image folder.

Each rank records which sample (file, or TFRecord file and byte offset) every batch item
came from and with which label; rank 0 checks over all ranks that in each training epoch no
sample is used twice, every rank ran the same number of full batches, the samples left out
are fewer than the documented remainder, the order changes between epochs, validation
covers every image exactly once, and every label is torchvision ImageFolder's for that file.
A mid-epoch start (resume) must continue with exactly the samples of the uninterrupted epoch.

    mpirun -np 2 python dali_shards.py RECORDS_DIR IMAGE_FOLDER_DIR
"""

import json
import sys
from pathlib import Path

import torch
from script import start_engine
from torchvision import datasets

from largebatch.config import parse_config
from largebatch.data.dali import DaliInput
from largebatch.data.tfrecord import decode_example, read_records, record_files

BATCH, VAL_BATCH = 16, 32


def truth(records: Path, images: Path, fmt: str) -> dict[str, dict[str, int]]:
    """{split: {sample id: ImageFolder label}} for every sample of the data set."""
    out = {}
    for split, folder in (("train", "train"), ("validation", "val")):
        labels = {path: label for path, label in datasets.ImageFolder(str(images / folder)).samples}
        if fmt == "folder":
            out[split] = labels
            continue
        out[split] = {}
        for path in record_files(records / split):
            for offset, _, payload in read_records(path):
                name = decode_example(payload)["image/filename"][0].decode()
                out[split][f"{path} at index {offset}"] = labels[str(images / folder / name)]
    return out


def collect(data: DaliInput, split: str, epoch: int = 0, start: int = 0) -> list[tuple[str, int]]:
    items = []
    for images, labels, ids in data.batches(split, epoch, start, with_ids=True):
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32, images.shape
        items += list(zip(ids, labels.tolist()))
    return items


def check_format(dist, records: Path, images: Path, fmt: str) -> None:
    root = records if fmt == "tfrecord" else images
    cfg = parse_config(
        [
            "--data-dir",
            str(root),
            "--data-format",
            fmt,
            "--dali-device",
            "cpu",
            "--dali-threads",
            "1",
            "--image-size",
            "16",
            "--val-resize",
            "16",
            "--batch-size",
            str(BATCH),
            "--val-batch-size",
            str(VAL_BATCH),
            "--model",
            "resnet18",
            "--seed",
            "3",
        ],
        "dali",
    )
    data = DaliInput(cfg, dist.rank, dist.size, torch.device("cpu"))
    mine = {
        "bpe": data.batches_per_epoch,
        "epochs": [collect(data, "train", e) for e in range(2)],
        "val": collect(data, "validation"),
    }
    # A resumed epoch: the same samples as the uninterrupted one from batch 3 on.
    resumed = collect(data, "train", 1, start=3)
    assert resumed == mine["epochs"][1][3 * BATCH :], f"rank {dist.rank} {fmt}: resumed epoch differs"
    everyone = dist.allgather_object(mine, name=f"ids_{fmt}")
    if not dist.is_main:
        return
    expected = truth(records, images, fmt)
    n_train = len(expected["train"])
    assert len({r["bpe"] for r in everyone}) == 1, "ranks disagree on batches per epoch"
    bpe = everyone[0]["bpe"]
    assert bpe == (n_train // dist.size) // BATCH
    for epoch in range(2):
        used = [item for r in everyone for item in r["epochs"][epoch]]
        ids = [i for i, _ in used]
        assert all(len(r["epochs"][epoch]) == bpe * BATCH for r in everyone), "a rank ran a different number of samples"
        assert len(set(ids)) == len(ids), f"{fmt} epoch {epoch}: a sample was used twice"
        assert set(ids) <= set(expected["train"]), f"{fmt}: unknown sample ids"
        assert n_train - len(ids) < dist.size * (BATCH + 1), "more samples left out than the last-batch policy allows"
        wrong = [(i, label) for i, label in used if expected["train"][i] != label]
        assert not wrong, f"{fmt}: labels differ from ImageFolder's: {wrong[:3]}"
    for r in everyone:
        orders = [[i for i, _ in epoch] for epoch in r["epochs"]]
        assert orders[0] != orders[1], "the order did not change between epochs"
    val = [item for r in everyone for item in r["val"]]
    assert sorted(i for i, _ in val) == sorted(expected["validation"]), f"{fmt}: validation is not every image once"
    wrong = [(i, label) for i, label in val if expected["validation"][i] != label]
    assert not wrong, f"{fmt}: validation labels differ from ImageFolder's: {wrong[:3]}"
    print(
        json.dumps(
            {"format": fmt, "train": n_train, "used_per_epoch": dist.size * bpe * BATCH, "validation": len(val)}
        ),
        flush=True,
    )


def main():
    dist = start_engine()
    records, images = Path(sys.argv[1]), Path(sys.argv[2])
    for fmt in ("tfrecord", "folder"):
        check_format(dist, records, images, fmt)
    print(json.dumps({"check": "shards", "rank": dist.rank}), flush=True)  # each sample once, labels as ImageFolder's


if __name__ == "__main__":
    main()
