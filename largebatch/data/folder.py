"""ImageFolder input (torchvision), tolerant of unreadable images.

A file that cannot be decoded is dropped from its batch, counted, and reported once per
file by rank-local warnings; the run goes on. A training class none of whose images can be
decoded is refused at start (the run would otherwise train without it and say nothing).
A warning the decoder gives (PIL's on very large images) is one such line too. A transform
that fails on a decoded image is not a bad image but a bug or a flag it cannot use: the
run stops with one line (DataError).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ..argparsing import UsageError
from ..config import Config
from .checks import DataError, batches_per_epoch, printable, same_classes
from .prefetch import CudaPrefetcher
from .sampler import TrainShard, ValShard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(uint8: bool) -> list:
    """On a GPU the batch stays uint8 and is normalised there (see prefetch.py)."""
    if uint8:
        return [transforms.PILToTensor()]
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(cfg: Config, uint8: bool = False) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(cfg.data.image_size, scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio),
            transforms.RandomHorizontalFlip(),
            *_to_tensor(uint8),
        ]
    )


def val_transform(cfg: Config, uint8: bool = False) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(cfg.data.val_resize),
            transforms.CenterCrop(cfg.data.image_size),
            *_to_tensor(uint8),
        ]
    )


# What a sample's read can report, besides its image: (kind, path, text)
UNREADABLE, DECODER_WARNING, TRANSFORM_FAILED = "unreadable", "warning", "transform"


class TolerantImageFolder(datasets.ImageFolder):
    """ImageFolder indexed by ``(index, sample_seed)``. Returns ``(image, target, notes)``:
    ``image`` is None when the file cannot be decoded or transformed, and ``notes`` lists
    what happened, as ``(kind, path, text)``, instead of raising."""

    def __getitem__(self, item):
        index, seed = item
        path, target = self.samples[index]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = self.loader(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                return None, target, [(UNREADABLE, path, f"{type(e).__name__}: {e}")]
        notes = [(DECODER_WARNING, path, f"{w.category.__name__}: {w.message}") for w in caught]
        try:
            # Seeding per sample makes augmentation independent of which worker reads it. The
            # CPU generator only: torch.manual_seed also queues seeds for CUDA, XPU and MTIA,
            # each with a formatted stack trace per call.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                return self.transform(image), target, notes
        except Exception as e:  # noqa: BLE001 (whatever it is, it is reported, not skipped)
            return None, target, [*notes, (TRANSFORM_FAILED, path, f"{type(e).__name__}: {e}")]


def _collate(items):
    good = [(x, y) for x, y, _ in items if x is not None]
    notes = [note for _, _, item_notes in items for note in item_notes]
    if not good:
        return None, None, notes
    images, labels = zip(*good)
    return torch.stack(images), torch.tensor(labels), notes


def _open(root: Path | None, flag: str, transform) -> TolerantImageFolder:
    if root is None or not root.exists():
        raise UsageError(f"{flag} {root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{flag} {root}: not a directory (a folder of class folders is expected)")
    try:
        return TolerantImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"{flag} {root}: {str(e).splitlines()[0]}") from None


def _check_readable_classes(dataset: TolerantImageFolder, flag: str, root: Path, rank: int, size: int) -> None:
    """Decode images of each class, in order, until one works; UsageError for a class with
    none. Each rank probes every size-th class (job.build_input gathers what every rank
    found), so a run normally decodes one image per class in all, whatever its size."""
    paths: dict[int, list[str]] = {}
    for path, target in dataset.samples:
        paths.setdefault(target, []).append(path)
    for target in range(rank, len(dataset.classes), size):
        failure = None
        for path in paths.get(target, []):
            try:
                with warnings.catch_warnings():  # the training reports them, once per file
                    warnings.simplefilter("ignore")
                    dataset.loader(path)  # PIL: open and convert, which decodes the whole image
                break
            except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, ...)
                failure = failure or f"{path}: {type(e).__name__}: {' '.join(str(e).split())}"
        else:
            found = len(paths.get(target, []))
            raise UsageError(
                f"{flag} {root}: class {dataset.classes[target]!r} has no readable image ({found} "
                f"file(s), e.g. {failure}); fix or remove its folder"
            )


class FolderInput:
    """Training and validation batches from two ImageFolder trees."""

    def __init__(self, cfg: Config, rank: int, size: int, device: torch.device):
        self.cfg, self.rank, self.size, self.device = cfg, rank, size, device
        on_gpu = device.type == "cuda"
        self.train_set = _open(cfg.data.train_dir, "--train-dir", train_transform(cfg, uint8=on_gpu))
        self.val_set = _open(cfg.data.val_dir, "--val-dir", val_transform(cfg, uint8=on_gpu))
        same_classes(self.train_set.classes, self.val_set.classes, "--train-dir", "--val-dir")
        assert cfg.data.train_dir is not None  # _open refused a missing one
        _check_readable_classes(self.train_set, "--train-dir", cfg.data.train_dir, rank, size)
        self.num_classes = len(self.train_set.classes)
        if cfg.data.num_classes is not None and cfg.data.num_classes != self.num_classes:
            raise UsageError(
                f"--num-classes {cfg.data.num_classes} but {cfg.data.train_dir} has {self.num_classes} class folders"
            )
        self.batches_per_epoch = batches_per_epoch(cfg, size, len(self.train_set), str(cfg.data.train_dir))
        self.bad_files: set[str] = set()
        self._warned: set[str] = set()  # files whose decoder warnings were reported

    def train(self, epoch: int, start_batch: int = 0):
        sampler = TrainShard(
            len(self.train_set),
            self.rank,
            self.size,
            self.cfg.run.seed,
            epoch,
            start=start_batch * self.cfg.schedule.batch_size,
        )
        return self._batches(self.train_set, sampler, self.cfg.schedule.batch_size, drop_last=True)

    def val(self):
        sampler = ValShard(len(self.val_set), self.rank, self.size)
        return self._batches(self.val_set, sampler, self.cfg.data.val_batch_size, drop_last=False)

    def _batches(self, dataset, sampler, batch_size: int, drop_last: bool):
        # A worker process only pays for its start-up while the step runs on a batch already
        # loaded: a loader of n batches gets at most n - 1 (none for a one-batch validation).
        n_batches = len(sampler) // batch_size if drop_last else math.ceil(len(sampler) / batch_size)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=min(self.cfg.data.workers, max(0, n_batches - 1)),
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        batches = self._report_bad(loader)
        if self.device.type == "cuda":
            yield from CudaPrefetcher(batches, IMAGENET_MEAN, IMAGENET_STD, self.device)
        else:
            yield from batches

    def _report_bad(self, loader):
        for images, labels, notes in loader:
            for kind, path, text in notes:
                if kind == TRANSFORM_FAILED:
                    raise DataError(
                        f"the transform failed on {printable(path)} ({printable(text)}), which decoded: "
                        f"a bug, or a flag it cannot use; not skipped as an unreadable image"
                    )
                seen = self.bad_files if kind == UNREADABLE else self._warned
                if path not in seen:
                    seen.add(path)
                    what = "skipping unreadable image" if kind == UNREADABLE else "image"
                    print(f"warning: {what} {printable(path)} ({printable(text)})", file=sys.stderr, flush=True)
            yield images, labels
