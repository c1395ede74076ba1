"""NVIDIA DALI input: TFRecord shards or an image folder, decoded and augmented by DALI.

Layouts (``--data-dir DIR``):
  tfrecord  DIR/train/*, DIR/validation/* record files, DIR/idx_files/{train,validation}/* DALI
            index files of the same names, DIR/idx_files/dataset.json (label base, classes;
            written by ``python -m largebatch.data.tfrecord``, which also makes the rest).
  folder    DIR/train/<class>/*, DIR/val/<class>/*; class indices are torchvision
            ImageFolder's (sorted folder names), passed to DALI's file reader explicitly.

Devices: ``--dali-device cpu`` runs the whole pipeline on the CPU (``device_id=None``);
``gpu`` decodes with nvJPEG ("mixed") and resizes, crops, flips and normalises on the GPU.

Augmentation is the torchvision path's (``folder.py``): random resized crop with
``--crop-scale``/``--crop-ratio``, horizontal flip, ImageNet mean/std; validation resizes the
shorter side to ``--val-resize`` and centre-crops ``--image-size``. Batches are NCHW float32.

Sharding and the last batch, per epoch:
  training  every rank runs ``batches_per_epoch = (N // size) // batch_size`` full batches, the
            same number on every rank; no sample is read twice in an epoch. TFRecords: DALI's
            reader takes shard ``rank`` of ``size`` (``shard_id``/``num_shards``, contiguous
            record ranges) of the record files in an order shuffled per epoch (seed, epoch),
            and shuffles within its buffer (``initial_fill``); what is left of a shard after
            the last full batch (fewer than ``batch_size + 1`` samples, varying with the
            shuffle) sits out that epoch. Folders: the permutation and the per-rank share
            are ``sampler.TrainShard``'s, exactly as in the torchvision path; DALI reads that
            list as it is.
  validation every image exactly once over all ranks: TFRecords through DALI's shards with
            ``pad_last_batch`` (the padding, repeats of a shard's last record, is cut off
            before a batch is yielded); folders as ``sampler.ValShard``. The last batch of a
            rank may be short.

Resuming mid-epoch (``train(epoch, start_batch)``): each epoch's pipeline is built afresh
with seeds derived from (seed, epoch, rank), so an epoch's batches are reproducible.
TFRecords: the first ``start_batch`` batches are run through DALI again and dropped, so the
resumed epoch continues with exactly the batches (samples and crops) the interrupted one
would have had; it costs the input time of those batches. Folders: the reader starts at
sample ``start_batch * batch_size`` of the rank's list, so the samples and their order are
exact at no cost, while the random crops and flips of the rest of the epoch differ from the
interrupted run's.

Labels: TFRecord labels minus ``--label-offset`` (auto: the base recorded in dataset.json;
without it, the run stops and says how to get one); every batch's labels are checked
against ``[0, num_classes)``, so a wrong base stops the run instead of training on shifted
labels.

Unreadable data: DALI's decoders fail a whole pipeline without naming the sample. The
failed batches are then read again without decoding and their images decoded one at a time
to find the file (or TFRecord file and byte offset), and the run stops with one line naming
it. Unlike the torchvision path, DALI cannot drop a bad image and go on: remove or replace
it (for TFRecords, convert again).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..argparsing import UsageError
from ..config import Config
from .checks import DataError, batches_per_epoch, same_classes
from .folder import IMAGENET_MEAN, IMAGENET_STD
from .sampler import TrainShard, ValShard, mix, sample_seed
from .tfrecord import DATASET_JSON, ENCODED, LABEL, index_matches, read_index, record_files


def default_threads() -> int:
    """This rank's share of the node's cores, at most 8 (DALI gains little beyond that per
    GPU). A launcher that binds ranks to cores has already done the sharing."""
    cores = len(os.sched_getaffinity(0))
    if cores >= (os.cpu_count() or cores):
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("MPI_LOCALNRANKS") or "1"
        cores //= max(1, int(local))
    return max(1, min(8, cores))


@dataclass
class ReadPlan:
    """One pass of one rank over a split: the reader to build and which batches to yield."""

    reader: dict  # fn.readers.tfrecord / fn.readers.file arguments
    batch_size: int
    samples: int  # samples to yield, from the first yielded batch on
    skip_batches: int = 0  # batches run and dropped first (replay for a mid-epoch resume)
    training: bool = True
    seed: int = 0
    kind: str = "tfrecord"

    @property
    def batches(self) -> int:
        return self.skip_batches + -(-self.samples // self.batch_size)


class TFRecordSource:
    def __init__(self, root: Path, cfg: Config):
        self.root = root
        self.files = {split: self._files(split) for split in ("train", "validation")}
        self.counts = {split: sum(n for _, _, n in files) for split, files in self.files.items()}
        meta = self._metadata()
        self.offset, self.num_classes = self._labels(cfg, meta)

    def _files(self, split: str) -> list[tuple[str, str, int]]:
        folder, idx_folder = self.root / split, self.root / "idx_files" / split
        if not folder.is_dir():
            raise UsageError(
                f"--data-dir {self.root}: no {split}/ folder of TFRecord files "
                f"(or use --data-format folder for train/ and val/ image folders)"
            )
        files = record_files(folder)
        if not files:
            raise UsageError(f"{folder}: no TFRecord files")
        out = []
        for record in files:
            index = idx_folder / record.name
            if not index.is_file():
                raise UsageError(
                    f"{record}: no index file {index} (make them with "
                    f"python -m largebatch.data.tfrecord index {self.root})"
                )
            problem = index_matches(record, index)
            if problem:
                raise UsageError(
                    f"{problem} (make the index again: python -m largebatch.data.tfrecord index {self.root})"
                )
            out.append((str(record), str(index), len(read_index(index))))
        return out

    def _metadata(self) -> dict | None:
        path = self.root / "idx_files" / DATASET_JSON
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: unreadable ({e})") from None
        for split, count in self.counts.items():
            listed = meta.get("splits", {}).get(split, {}).get("records")
            if listed is not None and listed != count:
                raise UsageError(
                    f"{path} lists {listed} {split} records but the index files list {count}: "
                    f"stale; run python -m largebatch.data.tfrecord index {self.root}"
                )
        return meta

    def _labels(self, cfg: Config, meta: dict | None) -> tuple[int, int]:
        path = self.root / "idx_files" / DATASET_JSON
        base = meta.get("label_base") if meta else None
        assert cfg.dali is not None  # the DALI entry's config
        if cfg.dali.label_offset == "auto":
            if base is None:
                why = "is missing" if meta is None else "records no usual label base (0 or 1)"
                raise UsageError(
                    f"--label-offset auto: {path} {why}, so the label base is unknown; run "
                    f"python -m largebatch.data.tfrecord index {self.root}, or pass --label-offset 0|1 "
                    f"and --num-classes"
                )
            offset = base
        else:
            offset = int(cfg.dali.label_offset)
            if base is not None and base != offset:
                raise UsageError(
                    f"--label-offset {offset}, but {path} says labels start at {base}; "
                    f"use --label-offset auto (or {base})"
                )
        known = meta.get("num_classes") if meta else None
        if cfg.data.num_classes is None and known is None:
            raise UsageError(f"--num-classes is needed: {path} does not give the number of classes")
        if cfg.data.num_classes is not None and known is not None and cfg.data.num_classes < known:
            raise UsageError(f"--num-classes {cfg.data.num_classes}, but the labels of {self.root} need {known}")
        num_classes = cfg.data.num_classes or known
        assert num_classes is not None  # one of them is known, or the run stopped above
        return offset, num_classes

    def train_plan(self, cfg: Config, rank: int, size: int, epoch: int, start_batch: int, batches: int) -> ReadPlan:
        files = self.files["train"]
        # The same file order on every rank (DALI's shards are ranges of it), new each epoch.
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(mix(cfg.run.seed, epoch)))
        files = [files[i] for i in order.tolist()]
        seed = sample_seed(cfg.run.seed, epoch, rank) % 2**31
        reader = dict(
            path=[f for f, _, _ in files],
            index_path=[i for _, i, _ in files],
            shard_id=rank,
            num_shards=size,
            random_shuffle=True,
            initial_fill=min(1024, self.counts["train"] // size),
            stick_to_shard=True,
            pad_last_batch=True,
            seed=seed,
        )
        return ReadPlan(
            reader,
            cfg.schedule.batch_size,
            (batches - start_batch) * cfg.schedule.batch_size,
            skip_batches=start_batch,
            seed=seed,
        )

    def val_plan(self, cfg: Config, rank: int, size: int) -> ReadPlan:
        files, n = self.files["validation"], self.counts["validation"]
        # DALI's shard r of s holds records [n*r//s, n*(r+1)//s).
        shard = n * (rank + 1) // size - n * rank // size
        reader = dict(
            path=[f for f, _, _ in files],
            index_path=[i for _, i, _ in files],
            shard_id=rank,
            num_shards=size,
            random_shuffle=False,
            stick_to_shard=True,
            pad_last_batch=True,
        )
        return ReadPlan(reader, cfg.data.val_batch_size, shard, training=False)


class FolderSource:
    def __init__(self, root: Path, cfg: Config):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        assert cfg.dali is not None  # the DALI entry's config
        if cfg.dali.label_offset not in ("auto", "0"):
            raise UsageError("--label-offset applies to TFRecords; folder labels are class indices")
        sets = {}
        for split, folder in (("train", root / "train"), ("validation", root / "val")):
            if not folder.is_dir():
                raise UsageError(f"--data-dir {root}: no {folder.name}/ image folder")
            try:
                classes, class_to_idx = find_classes(str(folder))
                sets[split] = (classes, make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS))
            except (FileNotFoundError, RuntimeError) as e:
                raise UsageError(f"{folder}: {str(e).splitlines()[0]}") from None
        (classes, self.train), (val_classes, self.val) = sets["train"], sets["validation"]
        same_classes(classes, val_classes, f"{root}/train", f"{root}/val")
        if cfg.data.num_classes is not None and cfg.data.num_classes != len(classes):
            raise UsageError(f"--num-classes {cfg.data.num_classes} but {root}/train has {len(classes)} class folders")
        self.offset, self.num_classes = 0, len(classes)
        self.counts = {"train": len(self.train), "validation": len(self.val)}

    @staticmethod
    def _reader(samples: list[tuple[str, int]], indices: list[int]) -> dict:
        return dict(
            files=[samples[i][0] for i in indices],
            labels=[samples[i][1] for i in indices],
            random_shuffle=False,
            pad_last_batch=False,
        )

    def train_plan(self, cfg: Config, rank: int, size: int, epoch: int, start_batch: int, batches: int) -> ReadPlan:
        shard = TrainShard(
            len(self.train), rank, size, cfg.run.seed, epoch, start=start_batch * cfg.schedule.batch_size
        )
        indices = shard.indices[: (batches - start_batch) * cfg.schedule.batch_size]
        seed = sample_seed(cfg.run.seed, epoch, rank) % 2**31
        return ReadPlan(
            self._reader(self.train, indices), cfg.schedule.batch_size, len(indices), seed=seed, kind="file"
        )

    def val_plan(self, cfg: Config, rank: int, size: int) -> ReadPlan:
        indices = ValShard(len(self.val), rank, size).indices
        return ReadPlan(
            self._reader(self.val, indices), cfg.data.val_batch_size, len(indices), training=False, kind="file"
        )


class DaliInput:
    """Training and validation batches from DALI pipelines; see the module docstring."""

    def __init__(self, cfg: Config, rank: int, size: int, device: torch.device):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise UsageError(
                "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, see requirements.txt)"
            ) from None
        assert cfg.dali is not None  # the DALI entry's config
        if cfg.dali.dali_device == "gpu":
            if device.type != "cuda":
                why = "--no-cuda was given" if cfg.numerics.no_cuda else "no CUDA GPU is visible to this process"
                raise UsageError(f"--dali-device gpu needs a GPU, but {why}; use --dali-device cpu")
            self.device_id: int | None = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.cfg, self.rank, self.size, self.device = cfg, rank, size, device
        self.threads = cfg.dali.dali_threads or default_threads()
        root = cfg.dali.data_dir
        if root is None or not root.is_dir():
            raise UsageError(f"--data-dir {root}: no such directory")
        self.source = TFRecordSource(root, cfg) if cfg.dali.data_format == "tfrecord" else FolderSource(root, cfg)
        self.num_classes = self.source.num_classes
        n_train = self.source.counts["train"]
        self.batches_per_epoch = batches_per_epoch(cfg, size, n_train, str(root))
        self.bad_files: set[str] = set()

    # --- the input interface -------------------------------------------------------------
    def train(self, epoch: int, start_batch: int = 0):
        for images, labels, _ in self.batches("train", epoch, start_batch):
            yield images, labels

    def val(self):
        for images, labels, _ in self.batches("validation"):
            yield images, labels

    def batches(self, split: str, epoch: int = 0, start_batch: int = 0, with_ids: bool = False):
        """(images, labels, ids) per batch; ids is a list naming each sample's source (a
        file, or 'RECORD_FILE at index BYTE_OFFSET') with ``with_ids``, else None."""
        if split == "train":
            plan = self.source.train_plan(self.cfg, self.rank, self.size, epoch, start_batch, self.batches_per_epoch)
        else:
            plan = self.source.val_plan(self.cfg, self.rank, self.size)
        if plan.samples == 0:
            return
        pipe = self._pipeline(plan, with_ids)
        left = plan.samples
        try:
            for k in range(plan.batches):
                try:
                    outputs = pipe.run()
                except RuntimeError as e:
                    raise self._diagnose(plan, k, e) from None
                if k < plan.skip_batches:
                    continue
                keep = min(plan.batch_size, left)  # cuts DALI's padding off the last batch
                left -= keep
                images = self._to_torch(outputs[0])[:keep]
                labels = self._to_torch(outputs[1]).view(-1)[:keep].long() - self.source.offset
                self._check_labels(labels, split)
                ids = [np.array(outputs[2].at(i)).tobytes().decode() for i in range(keep)] if with_ids else None
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), ids
        finally:
            del pipe

    # --- pipelines ------------------------------------------------------------------------
    def _pipeline(self, plan: ReadPlan, with_ids: bool, decode: bool = True):
        from nvidia.dali import Pipeline, fn, types

        cfg = self.cfg
        assert cfg.dali is not None  # the DALI entry's config
        pipe = Pipeline(
            batch_size=plan.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            seed=plan.seed + 1,
            prefetch_queue_depth=cfg.dali.dali_prefetch,
        )
        with pipe:
            encoded, labels = self._read(plan)
            if not decode:
                pipe.set_outputs(encoded, fn.get_property(encoded, key="source_info"))
            else:
                gpu = self.device_id is not None
                decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
                if gpu:  # NVIDIA's ImageNet examples' values: fewer reallocations for full-size JPEGs
                    decoder.update(device_memory_padding=211025920, host_memory_padding=140544512)
                normalize = dict(
                    dtype=types.FLOAT,
                    output_layout="CHW",
                    mean=[255 * m for m in IMAGENET_MEAN],
                    std=[255 * s for s in IMAGENET_STD],
                )
                if plan.training:
                    images = fn.decoders.image_random_crop(
                        encoded,
                        random_area=list(cfg.data.crop_scale),
                        random_aspect_ratio=list(cfg.data.crop_ratio),
                        num_attempts=10,
                        **decoder,
                    )
                    images = fn.resize(
                        images,
                        resize_x=cfg.data.image_size,
                        resize_y=cfg.data.image_size,
                        interp_type=types.INTERP_LINEAR,
                        antialias=True,
                    )
                    images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), **normalize)
                else:
                    images = fn.decoders.image(encoded, **decoder)
                    images = fn.resize(
                        images, resize_shorter=cfg.data.val_resize, interp_type=types.INTERP_LINEAR, antialias=True
                    )
                    images = fn.crop_mirror_normalize(
                        images, crop=(cfg.data.image_size, cfg.data.image_size), **normalize
                    )
                outputs = [images, labels]
                if with_ids:
                    outputs.append(fn.get_property(encoded, key="source_info"))
                pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    @staticmethod
    def _read(plan: ReadPlan):
        from nvidia.dali import fn, tfrecord

        if plan.kind == "file":
            return fn.readers.file(**plan.reader, name="Reader")
        features = {
            ENCODED: tfrecord.FixedLenFeature([], tfrecord.string, ""),
            LABEL: tfrecord.FixedLenFeature([1], tfrecord.int64, -1),
        }
        records = fn.readers.tfrecord(**plan.reader, features=features, name="Reader")
        return records[ENCODED], records[LABEL]  # type: ignore[call-overload,index]  # a dict: DALI's stub is wrong

    def _to_torch(self, batch) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type
        from nvidia.dali.tensors import TensorListGPU

        tensor = batch.as_tensor()
        on_gpu = isinstance(batch, TensorListGPU)
        where: torch.device | str = "cpu"
        if on_gpu:
            assert self.device_id is not None  # only a GPU pipeline gives GPU batches
            where = torch.device("cuda", self.device_id)
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=where)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device) if on_gpu else None)
        return out

    def _check_labels(self, labels: torch.Tensor, split: str) -> None:
        low, high = int(labels.min()), int(labels.max())
        assert self.cfg.dali is not None  # the DALI entry's config
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise DataError(
                f"{split} label {bad + self.source.offset} in {self.cfg.dali.data_dir} is outside "
                f"0..{self.num_classes - 1} after subtracting --label-offset {self.source.offset}: "
                f"wrong --label-offset or --num-classes?"
            )

    # --- unreadable data --------------------------------------------------------------------
    def _diagnose(self, plan: ReadPlan, failed: int, error: RuntimeError) -> DataError:
        """Find the sample that made batch ``failed`` (or one prefetched after it) fail."""
        from nvidia.dali import Pipeline, fn, types

        reason = _dali_reason(str(error))
        assert self.cfg.dali is not None  # the DALI entry's config
        window = range(failed, min(plan.batches, failed + self.cfg.dali.dali_prefetch + 2))
        try:
            reader = self._pipeline(plan, with_ids=False, decode=False)
            candidates = []
            for k in range(window.stop):
                encoded, sources = reader.run()
                if k in window:
                    candidates += [
                        (np.array(encoded.at(i)), np.array(sources.at(i)).tobytes().decode())
                        for i in range(len(encoded))
                    ]
            del reader
        except RuntimeError as e:  # the reader itself fails: its message is all there is
            return DataError(f"DALI cannot read {self.cfg.dali.data_dir}: {_dali_reason(str(e))}")
        probe = Pipeline(
            batch_size=1, num_threads=1, device_id=None, exec_pipelined=False, exec_async=False, prefetch_queue_depth=1
        )
        with probe:
            probe.set_outputs(
                fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device="cpu")
            )
        probe.build()
        for data, source in candidates:
            try:
                probe.feed_input("encoded", [data])
                probe.run()
            except RuntimeError:
                self.bad_files.add(source)
                where = source.replace(" at index ", ", the record at byte ")  # DALI's wording for TFRecords
                return DataError(
                    f"unreadable image in {where}: DALI cannot decode it ({reason}); remove or replace "
                    f"it (TFRecords: convert again)"
                )
        sources = ", ".join(s for _, s in candidates[:3])
        return DataError(f"DALI failed on rank {self.rank} ({reason}); its batch held {sources}, ...")


def _dali_reason(message: str) -> str:
    """The line of a DALI error that says what happened, without its pipeline traceback."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        lines = [ln for ln in after if "no longer valid" not in ln] or after
    lines = [ln for ln in lines if not ln.startswith("Critical error")] or lines
    return re.sub(r"\s+", " ", lines[0]) if lines else "unknown error"
