"""Read the scalars back out of a run's TensorBoard event files (for reports and tests).

Event files are TFRecord-framed ``Event`` protobufs: per record an 8-byte length, a 4-byte
CRC of it, the payload, a 4-byte CRC of the payload. tensorboardX ships the protobuf
classes, so no TensorFlow or TensorBoard install is needed to read them; without
tensorboardX, the ``tensorboard`` package's copies of the same classes serve.
"""

from __future__ import annotations

import struct
from pathlib import Path

try:
    from tensorboardX.proto import event_pb2
except ImportError:  # a machine with PyTorch's TensorBoard writer instead (see logs.Board)
    from tensorboard.compat.proto import event_pb2


def read_records(path: Path):
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)
            if len(payload) < length:
                return  # a file still being written ends mid-record
            yield payload


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file in ``run_dir``, in step order.
    A step written again after a resume replaces the earlier value."""
    return {tag: [(step, value) for step, value, _ in rows] for tag, rows in read_scalars_timed(run_dir).items()}


def read_scalars_timed(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Like ``read_scalars``, with each value's wall-clock time (seconds since the epoch):
    {tag: [(step, value, wall_time), ...]}, for durations and throughput between steps."""
    values: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for payload in read_records(path):
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    values.setdefault(v.tag, {})[event.step] = (v.simple_value, event.wall_time)
    return {tag: [(step, value, t) for step, (value, t) in sorted(steps.items())] for tag, steps in values.items()}


def wall_time_spans(run_dir: Path) -> list[tuple[float, float]]:
    """(first, last) wall-clock time of the records of each event file: one file per start
    of the job, so their sum is the time spent training without the gaps between resumes."""
    spans = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        times = [event_pb2.Event.FromString(payload).wall_time for payload in read_records(path)]
        if times:
            spans.append((min(times), max(times)))
    return spans


def histogram_tags(run_dir: Path) -> set[str]:
    tags = set()
    for path in Path(run_dir).glob("events.out.tfevents.*"):
        for payload in read_records(path):
            for v in event_pb2.Event.FromString(payload).summary.value:
                if v.HasField("histo"):
                    tags.add(v.tag)
    return tags
