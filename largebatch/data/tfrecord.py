"""Image folders to TFRecord shards plus DALI index files, without TensorFlow.

    python -m largebatch.data.tfrecord convert SRC OUT [--shard-size 1250] [--workers N]
    python -m largebatch.data.tfrecord index DIR [--workers N]

``convert`` reads the ImageFolder trees SRC/train and SRC/val (one folder per class) and
writes the layout the DALI job reads:

    OUT/train/train-00000-of-01025, ...             TFRecord shards (training order shuffled)
    OUT/validation/validation-00000-of-00040, ...
    OUT/idx_files/train/train-00000-of-01025, ...   DALI index files, same names
    OUT/idx_files/validation/...
    OUT/idx_files/dataset.json                      label base, classes, record counts

``index`` is for TFRecords made elsewhere: it writes idx_files/ and dataset.json for an
existing DIR/train, DIR/validation, checking every record on the way.

Records carry the features of the usual ImageNet conversion: ``image/encoded`` (the file's
bytes, not re-encoded), ``image/class/label`` (int64), ``image/class/synset`` (the class
folder name), ``image/filename`` (path inside the split folder) and ``image/format``.
Class indices are torchvision ImageFolder's (sorted folder names). Labels are written
1-based by default, as the usual ImageNet conversion does (0 was its "background" class);
``--label-base 0`` writes 0-based ones. dataset.json records the base, so the job's
``--label-offset auto`` subtracts the right amount.

Resumable: each shard goes to a temporary file that is renamed when it is complete and
verified, and its index file is renamed after it; a second run skips every shard whose index
exists and matches, so an interrupted conversion continues where it stopped. The plan
(inputs, order, shard sizes, label base) is saved in OUT/.convert-plan.json, and a run with
different inputs or settings refuses to mix its shards with the old ones.

Verification: every shard is read back before it is renamed (record framing and both CRCs,
the number of records, and each record's label and file name against the plan); shards a
resumed run skips are checked against their index (record count, file size).

The TFRecord framing is: uint64 length, uint32 masked CRC-32C of the length, the payload,
uint32 masked CRC-32C of the payload (little-endian). The payload is a ``tf.train.Example``
protobuf, encoded by hand below (four message types, two wire types). The CRC-32C comes from
``google-crc32c`` (Google's C implementation, a small wheel): the pure-Python alternative runs
at about 8 MB/s, hours of CPU time for ImageNet's 140 GB.

Bad input (missing folders, classes that differ between train and val, an unreadable image,
a corrupt record) ends the run with a one-line error naming the file, exit status 2; shards
already finished are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import google_crc32c

from ..argparsing import Parser, UsageError
from ..files import atomic_write
from .checks import DataError, same_classes

SPLITS = {"train": "train", "validation": "val"}  # TFRecord folder -> ImageFolder folder
LABEL = "image/class/label"
ENCODED = "image/encoded"
DATASET_JSON = "dataset.json"
PLAN_JSON = ".convert-plan.json"


# --- TFRecord framing ---------------------------------------------------------------------


def masked_crc(data: bytes) -> int:
    """TFRecord's CRC: CRC-32C rotated right by 15 bits plus a constant, so that a CRC of
    data that itself holds CRCs does not degenerate."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc(header)) + payload + struct.pack("<I", masked_crc(payload))


def read_records(path: Path):
    """Yield ``(offset, size, payload)`` per record, ``size`` being the whole framed record
    (what DALI's index lists); raises DataError at the first damaged record."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < file_size:
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise DataError(f"{path}: bad length checksum at byte {offset} (not a TFRecord file, or corrupt)")
            payload = f.read(length)
            footer = f.read(4)
            if len(payload) < length or len(footer) < 4:
                raise DataError(f"{path}: record at byte {offset} is truncated")
            if struct.unpack("<I", footer)[0] != masked_crc(payload):
                raise DataError(f"{path}: bad data checksum in the record at byte {offset}")
            yield offset, 16 + length, payload
            offset += 16 + length


# --- tf.train.Example, by hand -------------------------------------------------------------
# message Example  { Features features = 1; }
# message Features { map<string, Feature> feature = 1; }   (entries: key = 1, value = 2)
# message Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                                 Int64List int64_list = 3; } }
# message BytesList { repeated bytes value = 1; }
# message Int64List { repeated int64 value = 1 [packed = true]; }


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | int]) -> bytes:
    """A tf.train.Example with one value per feature: bytes -> BytesList, int -> Int64List."""
    entries = []
    for key, value in features.items():
        if isinstance(value, bytes):
            feature = _field(1, _field(1, value))
        else:
            feature = _field(3, _field(1, _varint(value)))
        entries.append(_field(1, _field(1, key.encode()) + _field(2, feature)))
    return _field(1, b"".join(entries))


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield ``(field number, wire type, value)``: an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("protobuf message ends inside a field")
        yield number, wire, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_example(payload: bytes) -> dict[str, list]:
    """{feature name: values} for the BytesList and Int64List features of an Example
    (FloatList features are left out: nothing here reads them)."""
    out: dict[str, list] = {}
    for number, _, features in _fields(payload):
        if number != 1:
            continue
        for _, _, entry in _fields(features):
            key, feature = b"", b""
            for n, _, v in _fields(entry):
                if n == 1:
                    key = v
                elif n == 2:
                    feature = v
            for kind, _, values in _fields(feature):
                if kind == 1:  # BytesList
                    out[key.decode()] = [bytes(v) for n, _, v in _fields(values) if n == 1]
                elif kind == 3:  # Int64List, packed or not
                    ints = []
                    for n, wire, v in _fields(values):
                        if n == 1 and wire == 0:
                            ints.append(_int64(v))
                        elif n == 1 and wire == 2:
                            pos = 0
                            while pos < len(v):
                                x, pos = _read_varint(v, pos)
                                ints.append(_int64(x))
                    out[key.decode()] = ints
    return out


# --- DALI index files ------------------------------------------------------------------------


def read_index(path: Path) -> list[tuple[int, int]]:
    """``(offset, size)`` per record, as DALI's tfrecord2idx writes them."""
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            offset, size = line.split()[:2]
            entries.append((int(offset), int(size)))
    return entries


def index_matches(record: Path, index: Path, expected: int | None = None) -> str:
    """'' when ``index`` is a plausible index of ``record`` (it ends where the file ends and,
    if given, has ``expected`` entries); otherwise what is wrong."""
    try:
        entries = read_index(index)
    except (OSError, ValueError) as e:
        return f"unreadable index {index} ({e})"
    if expected is not None and len(entries) != expected:
        return f"{index} lists {len(entries)} records, expected {expected}"
    end = entries[-1][0] + entries[-1][1] if entries else 0
    size = record.stat().st_size
    if end != size:
        return (
            f"{index} does not match {record} (index ends at byte {end}, file has {size}): "
            f"stale index or truncated file"
        )
    return ""


def _write_atomically(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


# --- convert -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    split: str  # "train" or "validation"
    name: str  # e.g. train-00003-of-00008
    samples: tuple[tuple[str, str, int, str], ...]  # (path, name inside split, label, synset)


def _image_problem(data: bytes) -> str:
    """'' if PIL can decode the image; draft mode decodes JPEGs at 1/8 scale, which still
    walks the whole entropy-coded stream, so truncation and corruption show up cheaply."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return ""
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(e).__name__}: {e}"


def write_shard(out: Path, shard: Shard) -> int:
    """Write, verify and rename one shard and its index; returns its record count."""
    record_path = out / shard.split / shard.name
    index_path = out / "idx_files" / shard.split / shard.name
    index_lines = []

    def write(f):
        offset = 0
        for path, relative, label, synset in shard.samples:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
            problem = _image_problem(data)
            if problem:
                raise DataError(
                    f"{path}: not a readable image ({problem}); fix or remove it and run again "
                    f"(finished shards are kept)"
                )
            fmt = b"PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else b"JPEG"
            record = frame(
                encode_example(
                    {
                        ENCODED: data,
                        LABEL: label,
                        "image/class/synset": synset.encode(),
                        "image/filename": relative.encode(),
                        "image/format": fmt,
                    }
                )
            )
            f.write(record)
            index_lines.append(f"{offset} {len(record)}\n")
            offset += len(record)

    atomic_write(record_path, write, verify=lambda tmp: _verify_shard(tmp, shard, index_lines))
    _write_atomically(index_path, "".join(index_lines).encode())
    return len(shard.samples)


def _verify_shard(path: Path, shard: Shard, index_lines: list[str]) -> None:
    found = []
    for offset, size, payload in read_records(path):
        example = decode_example(payload)
        found.append((f"{offset} {size}\n", example[LABEL][0], example["image/filename"][0].decode()))
    expected = [(line, label, relative) for line, (_, relative, label, _) in zip(index_lines, shard.samples)]
    if len(found) != len(shard.samples):
        raise DataError(f"{path}: read back {len(found)} records, wrote {len(shard.samples)}")
    if found != expected:
        raise DataError(f"{path}: records read back differ from what was written (labels or order)")


def _class_samples(root: Path, class_to_idx: dict[str, int] | None = None):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, found = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx or found, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"{root}: {str(e).splitlines()[0]}") from None
    return classes, samples


def plan_conversion(src: Path, shard_size: int, label_base: int, seed: int) -> tuple[list[str], list[Shard]]:
    import numpy as np

    for name in SPLITS.values():
        if not (src / name).is_dir():
            raise UsageError(f"{src / name}: no such directory (SRC needs train/ and val/, one folder per class)")
    classes, train = _class_samples(src / "train")
    val_classes, _ = _class_samples(src / "val")
    same_classes(classes, val_classes, f"{src}/train", f"{src}/val")
    _, val = _class_samples(src / "val", {c: i for i, c in enumerate(classes)})
    # The training order is shuffled once here: DALI's reader shuffles only within a buffer,
    # so shards must not hold one class each.
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    shards = []
    for split, samples in (("train", train), ("validation", val)):
        folder = src / SPLITS[split]
        count = max(1, math.ceil(len(samples) / shard_size))
        for i in range(count):
            chunk = samples[len(samples) * i // count : len(samples) * (i + 1) // count]
            shards.append(
                Shard(
                    split,
                    f"{split}-{i:05d}-of-{count:05d}",
                    tuple(
                        (path, str(Path(path).relative_to(folder)), idx + label_base, classes[idx])
                        for path, idx in chunk
                    ),
                )
            )
    return classes, shards


def _shard_done(out: Path, shard: Shard) -> bool:
    record, index = out / shard.split / shard.name, out / "idx_files" / shard.split / shard.name
    return record.is_file() and index.is_file() and not index_matches(record, index, len(shard.samples))


def _check_plan(out: Path, src: Path, shards: list[Shard], settings: dict) -> None:
    digest = hashlib.sha256(repr([(s.name, s.samples) for s in shards]).encode()).hexdigest()
    plan = {"source": str(src.resolve()), **settings, "shards": len(shards), "sha256": digest}
    path = out / PLAN_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise UsageError(
                f"{out} holds a conversion with other inputs or settings ({', '.join(changed)} changed); "
                f"use a new OUT or delete it"
            )
    elif any(record_files(out / split) for split in ("train", "validation") if (out / split).is_dir()):
        raise UsageError(f"{out} already holds train/ or validation/ from something else; use a new OUT")
    _write_atomically(path, (json.dumps(plan, indent=1) + "\n").encode())


def _run_pool(function, tasks: list, workers: int, total: int, desc: str, weight, unit: str) -> list:
    """Run ``function`` over ``tasks`` in ``workers`` processes with a progress bar in units
    of ``weight(task)``, counted in ``unit``; the first failure ends the pool and is raised."""
    from functools import partial

    from tqdm import tqdm

    results = []
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(function(task))
                bar.update(weight(task))
            return results
        # spawn, not fork: the progress bar's monitor thread is running, and a forked child
        # can inherit a lock that thread holds and wait on it forever.
        with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for task, result in pool.imap_unordered(partial(_with_task, function), tasks):
                results.append(result)
                bar.update(weight(task))
    return results


def _with_task(function, task):
    return task, function(task)


def convert(src: Path, out: Path, shard_size: int = 1250, workers: int = 1, label_base: int = 1, seed: int = 0) -> dict:
    """Convert ``src`` into ``out``; returns dataset.json's contents."""
    from functools import partial

    classes, shards = plan_conversion(src, shard_size, label_base, seed)
    for sub in ("train", "validation", "idx_files/train", "idx_files/validation"):
        try:
            (out / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {out / sub} ({e.strerror or e})") from None
    _check_plan(out, src, shards, {"shard_size": shard_size, "label_base": label_base, "seed": seed})
    for leftover in [*out.glob("*/.*.tmp-*"), *out.glob("idx_files/*/.*.tmp-*")]:  # from an interrupted run
        leftover.unlink()
    todo = [s for s in shards if not _shard_done(out, s)]
    done = len(shards) - len(todo)
    if done:
        print(f"{done} of {len(shards)} shards already finished; writing the other {len(todo)}", file=sys.stderr)
    _run_pool(
        partial(write_shard, out),
        todo,
        workers,
        sum(len(s.samples) for s in todo),
        "convert",
        lambda s: len(s.samples),
        "img",
    )
    summary: dict[str, Any] = {
        "label_base": label_base,
        "label_base_from": "converter",
        "num_classes": len(classes),
        "classes": classes,
        "splits": {},
    }
    for split in ("train", "validation"):
        labels = [sample[2] for s in shards if s.split == split for sample in s.samples]
        summary["splits"][split] = {
            "files": sum(s.split == split for s in shards),
            "records": len(labels),
            "min_label": min(labels, default=None),
            "max_label": max(labels, default=None),
        }
    for s in shards:  # every shard, the skipped ones too, against its index
        problem = index_matches(out / s.split / s.name, out / "idx_files" / s.split / s.name, len(s.samples))
        if problem:
            raise DataError(problem)
    _write_atomically(out / "idx_files" / DATASET_JSON, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


# --- index (TFRecords made elsewhere) ------------------------------------------------------------


def index_file(paths: tuple[Path, Path]) -> tuple[int, int | None, int | None]:
    """Write the DALI index of one TFRecord file, checking every record; returns
    (records, lowest label, highest label)."""
    record, index = paths
    lines, low, high = [], None, None
    for offset, size, payload in read_records(record):
        try:
            labels = decode_example(payload).get(LABEL)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise DataError(f"{record}: the record at byte {offset} is not a tf.train.Example ({e})") from None
        if not labels:
            raise DataError(f"{record}: the record at byte {offset} has no {LABEL} feature")
        low = labels[0] if low is None else min(low, labels[0])
        high = labels[0] if high is None else max(high, labels[0])
        lines.append(f"{offset} {size}\n")
    _write_atomically(index, "".join(lines).encode())
    return len(lines), low, high


def record_files(folder: Path) -> list[Path]:
    """The record files of a split folder: every plain file, sorted, but hidden ones
    (our temporary files start with a dot)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def index(root: Path, workers: int = 1) -> dict:
    """Write idx_files/ and dataset.json for the TFRecords in root/train and root/validation."""
    if not (root / "train").is_dir():
        raise UsageError(f"{root / 'train'}: no such directory (DIR needs train/ and validation/ TFRecord files)")
    summary: dict[str, Any] = {
        "label_base": None,
        "label_base_from": "lowest label",
        "num_classes": None,
        "classes": None,
        "splits": {},
    }
    for split in ("train", "validation"):
        folder = root / split
        files = record_files(folder) if folder.is_dir() else []
        if split == "train" and not files:
            raise UsageError(f"{folder}: no TFRecord files")
        (root / "idx_files" / split).mkdir(parents=True, exist_ok=True)
        tasks = [(p, root / "idx_files" / split / p.name) for p in files]
        results = _run_pool(index_file, tasks, workers, len(tasks), f"index {split}", lambda t: 1, "file")
        lows = [lo for _, lo, _ in results if lo is not None]
        highs = [hi for _, _, hi in results if hi is not None]
        summary["splits"][split] = {
            "files": len(files),
            "records": sum(n for n, _, _ in results),
            "min_label": min(lows, default=None),
            "max_label": max(highs, default=None),
        }
    low = min((s["min_label"] for s in summary["splits"].values() if s["min_label"] is not None), default=None)
    high = max((s["max_label"] for s in summary["splits"].values() if s["max_label"] is not None), default=None)
    if low in (0, 1):  # the two conventions in use; anything else needs the user's word
        summary["label_base"] = low
        summary["num_classes"] = high - low + 1
    _write_atomically(root / "idx_files" / DATASET_JSON, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


# --- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    prog = "python -m largebatch.data.tfrecord"
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("convert", help="ImageFolder trees SRC/train, SRC/val -> TFRecords + DALI index files in OUT")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--shard-size", type=_positive, default=1250, help="images per shard (ImageNet: 1024 train shards)")
    c.add_argument(
        "--label-base",
        type=int,
        choices=[0, 1],
        default=1,
        help="label of the first class: 1 as the usual ImageNet conversion, or 0",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the training-set shuffle")
    c.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, help="parallel processes")
    i = sub.add_parser("index", help="DALI index files and dataset.json for existing TFRecords in DIR")
    i.add_argument("dir", type=Path)
    i.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, help="parallel processes")
    try:
        args = p.parse_args(argv)
        if args.command == "convert":
            summary = convert(args.src, args.out, args.shard_size, args.workers, args.label_base, args.seed)
            target = args.out
        else:
            summary = index(args.dir, args.workers)
            target = args.dir
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (finished shards are kept; run again to continue)", file=sys.stderr, flush=True)
        return 130
    splits = ", ".join(f"{s['records']} {name} records in {s['files']} files" for name, s in summary["splits"].items())
    base = summary["label_base"]
    print(
        f"{target}: {splits}; labels {'start at ' + str(base) if base is not None else 'have an unusual base'}, "
        f"{summary['num_classes'] or '?'} classes"
    )
    if base is None:
        print("the job will need --label-offset and --num-classes for this data", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
