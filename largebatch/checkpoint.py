"""Full-state checkpoints: verified writes, keep the last K, resume from the newest intact one.

API (rank 0 calls all of it; ``store = CheckpointStore(run_dir, name_format, keep)``):

    store.save(state, epoch_end, finite=None) -> Path
        write, verify, record and rotate; raises CheckpointWriteError (an OSError whose str
        is one line: the file, the space needed and free, that the previous one is intact)
    store.load_newest(warn=None, finite_only=False) -> (Path, dict) | None
        ``--resume auto``: the newest intact checkpoint; each damaged (or missing, or with
        ``finite_only`` non-finite) newer one is skipped with one ``warn`` line; None if none
        is listed; CheckpointError (one line) if every listed one that exists is unusable:
        a fresh start there would silently throw the run away
    load(path) -> dict
        ``--resume PATH``: verified against its directory's manifest when listed there;
        CheckpointError (a UsageError, one line) if damaged or not a checkpoint
    check_same_run(state, cfg, path)   UsageError if the checkpoint is another experiment's
    store.latest(finite_only=False) -> Path | None
                                       newest listed file that exists (not verified)
    store.name_for(epoch, step, epoch_end) -> str
    all_finite(state) -> bool          what ``save`` records when ``finite`` is not given

The run directory's lock and stale temporaries are runlock.py's and files.py's concern.

Contents: ``state.TrainState.state_dict`` defines them (and ``state.VERSION``).

Manifest. ``checkpoints.json`` holds ``files``, the names in the order written (the last
is the newest), and ``entries``, per name: ``sha256`` and ``size`` of the bytes written,
``finite`` (the model's and optimizer's floating-point tensors are all finite), ``epoch``,
``step``. The checksum is computed from the bytes as ``torch.save`` writes them, so a save
never rereads its file. A manifest of the previous version has only ``files``: its
checkpoints are accepted unverified, checked only by loading them.

Integrity. A read checks the size, then the sha256, then that ``torch.load`` accepts it,
then the keys. ``torch.load`` alone is not enough: 4 KiB of random bytes inside a tensor's
data loads without complaint (the zip reader does not check CRCs) and resumes a run on
garbage weights. A checkpoint away from its manifest (copied elsewhere, or a manifest that
was lost) still carries what verifies it: the CRC-32 that ``torch.save``'s zip writer
records for every member, which Python's ``zipfile`` checks here.

A lost or damaged manifest is rebuilt from the files in the run directory whose names the
checkpoint format gives, each verified, in the order of their steps; one warning line says
so. The manifest's names are plain file names: one with a path in it makes the manifest
damaged, so nothing outside the run directory is ever read or deleted through it.

Writing. A write goes to a temporary file that is flushed, fsynced, checked to have the size
written, renamed, and then recorded; only after that are older files rotated out.

Rotation. Only files whose names the checkpoint format gives are ever deleted. After a save
the newest ``keep`` files stay. If none of them is finite, the newest finite older one stays
too (so a run that diverges keeps a point to go back to, even with ``--keep-checkpoints 1``).
Entries without a ``finite`` field (old manifests) count as finite.

Disk space. The invariant: the newest checkpoint on disk is never deleted before a newer
one is written and verified. Before writing, if the free space is less than the size
expected (the newest checkpoint's, or the tensors' bytes if more), the files this save would
rotate out anyway are deleted first, oldest first, except the newest one and the newest
finite one. So a run needs room for ``max(keep, 2)`` checkpoints (``keep`` of them, or one
old and one being written), not ``keep + 1``; with ``--keep-checkpoints 1`` that is room
for two. When the write still fails for space, nothing was lost: the temporary file is
removed, the manifest is unchanged, and CheckpointWriteError says so in one line.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import string
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .argparsing import UsageError
from .config import Config
from .files import atomic_write
from .state import VERSION

MANIFEST = "checkpoints.json"
MANIFEST_FORMAT = 2  # 1 (no field): files only; 2: entries with sha256, size, finite
# Flags that define what a run is: resuming with any of them changed would continue a
# different experiment from this one's weights, so it is refused.
IDENTITY = (
    "model",
    "num_classes",
    "batch_size",
    "batches_per_allreduce",
    "base_op",
    "epochs",
    "lr_schedule",
    "image_size",
    "synthetic",
)
_SPACE_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit (ulimit -f) exceeded",
}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format starts with a pickle protocol marker


class CheckpointError(UsageError):
    """A checkpoint that cannot be used (damaged, truncated, not a checkpoint); one line."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written; ``str()`` is one line for the user, and the
    previous checkpoint is intact. ``errno`` is the underlying error's."""

    def __init__(self, code: int | None, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def warning(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class CheckpointStore:
    def __init__(
        self,
        run_dir: Path,
        name_format: str,
        keep: int,
        warn: Callable[[str], None] | None = None,
        read_only: bool = False,
    ):
        self.run_dir, self.keep, self.read_only = Path(run_dir), keep, read_only
        self.name_format = name_format.removeprefix("./")
        self.warn = warn or warning
        self._ours = _name_pattern(self.name_format)

    # --- manifest ---------------------------------------------------------------------------

    def _manifest(self) -> tuple[list[str], dict[str, dict]]:
        try:
            return _parse_manifest((self.run_dir / MANIFEST).read_text())
        except FileNotFoundError:
            why = "missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"damaged ({e})"
        return self._rebuild(why)

    def _rebuild(self, why: str) -> tuple[list[str], dict[str, dict]]:
        """The manifest from the checkpoint files themselves, each verified: a run directory
        whose manifest is gone still resumes where it stopped, never from step 0."""
        candidates = sorted(p for p in _regular_files(self.run_dir) if self.is_ours(p.name))
        if not candidates and why == "missing":
            return [], {}
        found, damaged = [], []
        for path in candidates:
            try:
                data = path.read_bytes()
                state = _load(path, None, data)
            except (OSError, CheckpointError):
                damaged.append(path.name)
                continue
            found.append(
                (
                    state["step"],
                    state["epoch"],
                    path.name,
                    {
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "finite": all_finite(state),
                        "epoch": state["epoch"],
                        "step": state["step"],
                    },
                )
            )
        found.sort(key=lambda item: item[:2])
        files, entries = [f[2] for f in found], {f[2]: f[3] for f in found}
        left_out = f", {len(damaged)} damaged one(s) left out ({', '.join(damaged[:3])})" if damaged else ""
        self.warn(
            f"warning: {self.run_dir / MANIFEST} was {why}; rebuilt it from the {len(files)} verified "
            f"checkpoint file(s) in the run directory{left_out}"
        )
        if not self.read_only:
            self._write_manifest(files, entries)
        return files, entries

    def is_ours(self, name: str) -> bool:
        """Whether ``name`` is one the checkpoint format gives: the only files rotation deletes."""
        return self._ours.fullmatch(name) is not None

    def _write_manifest(self, files: list[str], entries: dict[str, dict]) -> None:
        data = {"format": MANIFEST_FORMAT, "files": files, "entries": {f: entries[f] for f in files if f in entries}}
        atomic_write(self.run_dir / MANIFEST, lambda f: f.write(json.dumps(data, indent=1).encode()))

    def _files(self) -> list[str]:
        return self._manifest()[0]

    # --- naming and finding -----------------------------------------------------------------

    def latest(self, finite_only: bool = False) -> Path | None:
        files, entries = self._manifest()
        return _newest_existing(self.run_dir, files, entries if finite_only else None)

    def name_for(self, epoch: int, step: int, epoch_end: bool) -> str:
        name = self.name_format.format(epoch=epoch, step=step)
        if not epoch_end and "{step" not in self.name_format:
            # Mid-epoch files would otherwise take the name of an epoch-end checkpoint.
            stem, dot, suffix = name.partition(".")
            name = f"{stem}-step{step}{dot}{suffix}"
        return name

    def load_newest(
        self, warn: Callable[[str], None] | None = None, finite_only: bool = False
    ) -> tuple[Path, dict] | None:
        warn = warn or self.warn
        files, entries = self._manifest()
        damaged = nonfinite = 0
        for name in reversed(files):
            path, record = self.run_dir / name, entries.get(name)
            if not path.exists():
                # Removed by hand; not damage, but resuming from an older one should not go unnoticed.
                warn(f"warning: {path} is listed in {MANIFEST} but missing; trying an older checkpoint")
                continue
            if finite_only and record and record.get("finite") is False:
                nonfinite += 1
                warn(f"warning: {path} holds non-finite weights; trying an older checkpoint")
                continue
            try:
                return path, _load(path, record)
            except CheckpointError as e:
                damaged += 1
                warn(f"warning: {e}; trying an older checkpoint")
        if damaged or nonfinite:
            why = ", ".join(f"{n} {what}" for n, what in ((damaged, "damaged"), (nonfinite, "non-finite")) if n)
            raise CheckpointError(
                f"--log-dir {self.run_dir} holds no usable checkpoint ({why}); "
                f"pass --resume PATH, or remove them to start over"
            )
        return None

    # --- saving -----------------------------------------------------------------------------

    def save(self, state: dict, epoch_end: bool, finite: bool | None = None) -> Path:
        """Write, verify, record, then rotate; see the module docstring for the rules."""
        name = self.name_for(state["epoch"], state["step"], epoch_end)
        path = self.run_dir / name
        finite = all_finite(state) if finite is None else bool(finite)
        files, entries = self._manifest()
        overwrite = name in files  # a stop at an epoch end, say: the same position saved again
        previous = _newest_existing(self.run_dir, files)
        mode_like = previous
        expected = _expected_size(previous, state)
        try:
            files = self._make_room(files, entries, name, finite, previous, expected)
        except OSError as e:
            raise self._write_error(path, e, previous, expected, 0) from None

        writer = _HashingWriter()

        def write(f):
            writer.target = f
            torch.save(state, writer)

        def verify(tmp: Path) -> None:
            on_disk = tmp.stat().st_size
            if on_disk != writer.size:
                raise OSError(errno.EIO, f"wrote {writer.size} bytes but the file has {on_disk}")
            if overwrite and name in entries:
                # Same name as an existing checkpoint: until the manifest is rewritten below,
                # it describes the old contents, so accept either while the rename happens.
                old = {k: entries[name][k] for k in ("sha256", "size") if k in entries[name]}
                self._write_manifest(files, {**entries, name: {**record(), "previous": old}})

        def record() -> dict:
            return {
                "sha256": writer.sha256.hexdigest(),
                "size": writer.size,
                "finite": finite,
                "epoch": state["epoch"],
                "step": state["step"],
            }

        try:
            atomic_write(path, write, verify=verify, mode_like=mode_like)
        except Exception as e:
            # torch.save turns a failed write into a RuntimeError of its own (its zip writer
            # trips over the short file on the way out); the writer kept the real error.
            error = writer.error or (e if isinstance(e, OSError) else None)
            if error is None:
                raise
            raise self._write_error(path, error, previous, expected, writer.size) from None

        files = [f for f in files if f != name] + [name]
        entries = {**entries, name: record()}
        kept, stale = _rotate(files, entries, self.keep)
        try:
            self._write_manifest(kept, entries)
        except OSError as e:
            # A new name is complete but unlisted, and nothing would ever rotate it out. An
            # overwritten one stays: it is listed, and its entry accepts the new contents.
            if not overwrite:
                path.unlink(missing_ok=True)
            raise self._write_error(self.run_dir / MANIFEST, e, previous, expected, writer.size) from None
        for old in stale:
            self._delete(old)
        return path

    def _delete(self, name: str) -> None:
        if self.is_ours(name):  # never a file the run did not name itself
            (self.run_dir / name).unlink(missing_ok=True)

    def _make_room(self, files, entries, name, finite, previous, expected) -> list[str]:
        """Delete, before writing, files this save would rotate out anyway, while the free
        space is short; never the newest existing one or the newest finite one."""
        if not _short(self.run_dir, expected):
            return files
        future = [f for f in files if f != name] + [name]
        _, stale = _rotate(future, {**entries, name: {"finite": finite}}, self.keep)
        protected = {previous.name if previous else None, _newest_finite(self.run_dir, files, entries)}
        for old in [f for f in stale if f not in protected]:
            if not _short(self.run_dir, expected):
                break
            files = [f for f in files if f != old]
            self._write_manifest(files, entries)  # first: the manifest never lists a deleted file
            self._delete(old)
        return files

    def _write_error(
        self, path: Path, e: OSError, previous: Path | None, expected: int, written: int
    ) -> CheckpointWriteError:
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        if e.errno in _SPACE_ERRNOS:
            needed = max(expected, written + 1)
            hint = (
                "free space, or lower --keep-checkpoints"
                if self.keep > 1
                else "free space (a run needs room for two checkpoints while it replaces one)"
            )
            return CheckpointWriteError(
                e.errno,
                f"cannot write checkpoint {path}: {_SPACE_ERRNOS[e.errno]} "
                f"(needs {_human(needed)}, {_human(_free(self.run_dir))} free "
                f"on {self.run_dir}); {kept}; {hint}",
            )
        return CheckpointWriteError(e.errno, f"cannot write checkpoint {path} ({e.strerror or e}); {kept}")


def load(path: Path) -> dict:
    """Read an explicitly named checkpoint, verified against the manifest of its directory
    when that lists it (a damaged manifest is ignored here: the file may be all there is)."""
    path = Path(path)
    record = None
    try:
        files, entries = _parse_manifest((path.parent / MANIFEST).read_text())
        if path.name in files:
            record = entries.get(path.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return _load(path, record)


def check_world_size(state: dict, size: int, source: Path) -> None:
    """A run continues on the number of processes it was written by: its schedule counts
    steps of one global batch, and its data order is cut into that many shares."""
    saved = state.get("world_size")
    if saved is None or saved == size:
        return
    args = state.get("args", {})
    per_process = args.get("batch_size", 0) * args.get("batches_per_allreduce", 1)
    raise UsageError(
        f"{source} was written by {saved} processes (global batch {per_process * saved}) and this run "
        f"has {size} (global batch {per_process * size}): its schedule and data order hold only for "
        f"{saved}; resume it on {saved} processes, or start a new run in a new --log-dir"
    )


def check_same_run(state: dict, cfg: Config, source: Path) -> None:
    saved = state["args"]
    current = cfg.to_dict()
    differ = [
        k for k in IDENTITY if k in saved and saved[k] != current[k] and not (k == "num_classes" and current[k] is None)
    ]
    if differ:
        what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {current[k]})" for k in differ)
        raise UsageError(f"{source} belongs to a run with {what}; use a new --log-dir for a new run")


# Flags whose values a resumed run takes from the checkpoint, not from its command line: they
# live on in the optimizer's param groups and the schedule's state, which resume restores.
KEPT_FROM_CHECKPOINT = (
    "base_lr",
    "lr_scaling",
    "lr_power",
    "end_lr",
    "lr_decay_epochs",
    "warmup_epochs",
    "momentum",
    "wd",
    "epsilon",
    "lars_eta",
    "trust_clip",
)


def ignored_changes(state: dict, cfg: Config) -> str | None:
    """A warning line when the command line changes flags that a resume cannot honour."""
    saved, current = state["args"], cfg.to_dict()
    differ = [k for k in KEPT_FROM_CHECKPOINT if k in saved and saved[k] != current[k]]
    if not differ:
        return None
    what = ", ".join(f"--{k.replace('_', '-')} {current[k]} (the checkpoint's: {saved[k]})" for k in differ)
    return (
        f"warning: {what}: a resumed run keeps the checkpoint's values, which live on in its optimizer "
        f"and schedule state; a new --log-dir starts a run with the new ones"
    )


def all_finite(state: dict) -> bool:
    """Whether every floating-point tensor of the model and optimizer state is finite. Each
    tensor's minimum and maximum decide it (a NaN propagates into both; an infinity is one of
    them): one reduction per tensor, where ``isfinite(t).all()`` made a boolean copy of every
    tensor (the cost of each: docs/benchmarks.md)."""
    ends: dict[torch.device, list[torch.Tensor]] = {}
    for part in ("model", "optimizer"):
        for t in _tensors(state.get(part)):
            if t.is_complex():
                t = torch.view_as_real(t)
            if t.is_floating_point() and t.numel():
                ends.setdefault(t.device, []).extend(e.float() for e in t.aminmax())
    return all(bool(torch.isfinite(torch.stack(group)).all()) for group in ends.values())


# --- reading ----------------------------------------------------------------------------------


def _load(path: Path, record: dict | None, data: bytes | None = None) -> dict:
    if data is None:
        try:
            data = path.read_bytes()  # once: hashed and parsed from memory, not read twice
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror or e})") from None
    if not (record and "sha256" in record):
        _check_crcs(path, data)
    if record:
        accepted = [record, *([record["previous"]] if isinstance(record.get("previous"), dict) else [])]
        if "size" in record and all(len(data) != r.get("size") for r in accepted):
            raise CheckpointError(
                f"{path} is truncated or damaged: it has {len(data)} bytes, {record['size']} were written"
            )
        if "sha256" in record:
            digest = hashlib.sha256(data).hexdigest()
            if all(digest != r.get("sha256") for r in accepted):
                raise CheckpointError(f"{path} is damaged: its contents differ from what was written (sha256 mismatch)")
    state = _parse(path, data)
    missing = {"model", "optimizer", "epoch", "step", "args"} - set(state)
    if missing:
        raise CheckpointError(f"{path} is not a largebatch checkpoint (missing {', '.join(sorted(missing))})")
    if state.get("version", 1) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer largebatch (checkpoint version {state['version']}, "
            f"this one reads up to {VERSION}); upgrade to resume it"
        )
    return state


def _check_crcs(path: Path, data: bytes) -> None:
    """What a checkpoint carries wherever it is copied: the CRC-32 of every zip member."""
    if not data.startswith(_ZIP_MAGIC):
        return  # the legacy format has none; torch.load and the keys are all there is
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is truncated or damaged: its zip structure is broken ({_first_sentence(e)})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: its member {bad} fails its CRC-32 check")


def _parse(path: Path, data: bytes) -> dict:
    if not data:
        raise CheckpointError(f"{path} is empty, not a PyTorch checkpoint")
    if not data.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        what = "a text file?" if _looks_like_text(data[:4096]) else "unknown contents"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what})")
    try:
        with warnings.catch_warnings():  # torch's notes on legacy or foreign pickles: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError, ...
        raise CheckpointError(f"{path} is truncated or damaged: torch.load fails ({_first_sentence(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a largebatch checkpoint (it holds a {type(state).__name__})")
    return state


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def _first_sentence(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(". ")[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _parse_manifest(text: str) -> tuple[list[str], dict[str, dict]]:
    data = json.loads(text)
    files = data["files"]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError("'files' is not a list of names")
    outside = [f for f in files if not _plain_name(f)]
    if outside:
        raise ValueError(f"it names {outside[0]!r}, not a file name in the run directory")
    entries = data.get("entries", {})  # absent in the previous format
    if not isinstance(entries, dict):
        raise ValueError("'entries' is not a mapping")
    return files, {k: v for k, v in entries.items() if isinstance(v, dict)}


# --- writing ----------------------------------------------------------------------------------


class _HashingWriter:
    """File-like wrapper that hashes and counts what torch.save writes through it."""

    def __init__(self):
        self.target, self.sha256, self.size = None, hashlib.sha256(), 0
        self.error: OSError | None = None  # the first failed write's

    def write(self, data) -> int:
        try:
            written = self.target.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.target.flush()


def _rotate(files: list[str], entries: dict[str, dict], keep: int) -> tuple[list[str], list[str]]:
    """(kept, stale): the newest ``keep``, plus the newest finite older one if none of
    those is finite."""
    kept = files[-keep:]
    if not any(_maybe_finite(entries.get(f)) for f in kept):
        older = [f for f in files[:-keep] if _maybe_finite(entries.get(f))]
        if older:
            kept = [older[-1], *kept]
    return kept, [f for f in files if f not in kept]


def _maybe_finite(record: dict | None) -> bool:
    return record is None or record.get("finite", True) is not False


def _newest_existing(run_dir: Path, files: list[str], entries: dict[str, dict] | None = None) -> Path | None:
    """The newest listed file that exists; with ``entries``, the newest that may be finite."""
    for name in reversed(files):
        if (entries is None or _maybe_finite(entries.get(name))) and (run_dir / name).is_file():
            return run_dir / name
    return None


def _newest_finite(run_dir: Path, files: list[str], entries: dict[str, dict]) -> str | None:
    newest = _newest_existing(run_dir, files, entries)
    return newest.name if newest else None


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def _name_pattern(name_format: str) -> re.Pattern:
    """The names ``CheckpointStore.name_for`` gives: the format's fields as numbers, and the
    mid-epoch ``-stepN`` before the first dot when the format has no {step}."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(name_format):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"-?\d+")
    pattern = "".join(parts)
    if "{step" not in name_format:
        stem, dot, suffix = pattern.partition(r"\.")
        pattern = f"{stem}(?:-step\\d+)?{dot}{suffix}"
    return re.compile(pattern)


def _regular_files(directory: Path) -> list[Path]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]


def _expected_size(previous: Path | None, state: dict) -> int:
    """The newest checkpoint's size, or the tensors' bytes if more (the first save, a
    model that grew)."""
    tensors = sum(t.numel() * t.element_size() for t in _tensors(state))
    try:
        return max(tensors, previous.stat().st_size if previous is not None else 0)
    except OSError:
        return tensors


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _free(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:  # unknown: make no room (deletes nothing early), report "unknown"
        return None


def _short(directory: Path, expected: int) -> bool:
    free = _free(directory)
    # The margin covers the manifest and the zip format's overhead over the tensors' bytes.
    return free is not None and free < expected + 64 * 1024 + expected // 100


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
