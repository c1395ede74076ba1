"""The DALI input and the TFRecord converter end to end: real JPEG folders converted by the
real command, real DALI CPU pipelines, real `mpirun -np 2` jobs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from helpers import (
    FAST,
    MODEL,
    PYTHON,
    ROOT,
    TRAIN_DALI,
    env,
    latest_checkpoint,
    results,
    run_and_signal,
    run_job,
    run_mpi_script,
)
from largebatch.config import UsageError, parse_config
from largebatch.data import tfrecord
from largebatch.data.dali import DaliInput
from largebatch.data.folder import val_transform
from largebatch.events import read_scalars

SCRIPTS = Path(__file__).parent / "scripts"
SMALL = [
    "--image-size",
    "16",
    "--val-resize",
    "16",
    "--batch-size",
    "16",
    "--val-batch-size",
    "32",
    "--model",
    MODEL,
    "--dali-device",
    "cpu",
    "--dali-threads",
    "2",
]


def convert(src: Path, out: Path, *extra, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        PYTHON,
        "-m",
        "largebatch.data.tfrecord",
        "convert",
        src,
        out,
        "--shard-size",
        "50",
        "--workers",
        "2",
        *extra,
    ]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def tool(*args) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "largebatch.data.tfrecord", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def records(digits, tmp_path_factory) -> Path:
    """The digits folder converted by the command line tool, 1-based labels (the default)."""
    out = tmp_path_factory.mktemp("records") / "digits"
    convert(digits, out)
    return out


def dali_input(root: Path, fmt: str, *extra, rank: int = 0, size: int = 1) -> DaliInput:
    cfg = parse_config(["--data-dir", str(root), "--data-format", fmt, *SMALL, *map(str, extra)], "dali")
    return DaliInput(cfg, rank, size, torch.device("cpu"))


def record_names(root: Path) -> dict[str, str]:
    """{'RECORD_FILE at index OFFSET' (DALI's source info): image/filename} for every record."""
    out = {}
    for split in ("train", "validation"):
        for path in tfrecord.record_files(root / split):
            for offset, _, payload in tfrecord.read_records(path):
                out[f"{path} at index {offset}"] = tfrecord.decode_example(payload)["image/filename"][0].decode()
    return out


def val_labels(root: Path) -> dict[str, int]:
    """{image/filename: label} as the DALI pipeline yields them for the validation split."""
    names = record_names(root)
    return {
        names[i]: y
        for _, labels, ids in dali_input(root, "tfrecord").batches("validation", with_ids=True)
        for i, y in zip(ids, labels.tolist())
    }


# --- the converter ---------------------------------------------------------------------------


@pytest.mark.dali  # compares with DALI's own tfrecord2idx
def test_converter_layout_labels_and_index(digits, records, tmp_path):
    meta = json.loads((records / "idx_files" / "dataset.json").read_text())
    train = datasets.ImageFolder(str(digits / "train"))
    val = datasets.ImageFolder(str(digits / "val"))
    assert meta["label_base"] == 1 and meta["classes"] == train.classes and meta["num_classes"] == len(train.classes)
    assert meta["splits"]["train"]["records"] == len(train) and meta["splits"]["validation"]["records"] == len(val)
    truth = {f"train/{Path(p).relative_to(digits / 'train')}": y for p, y in train.samples}
    truth.update({f"val/{Path(p).relative_to(digits / 'val')}": y for p, y in val.samples})
    seen = []
    for split, folder in (("train", "train"), ("validation", "val")):
        files = tfrecord.record_files(records / split)
        assert [p.name for p in files] == [p.name for p in tfrecord.record_files(records / "idx_files" / split)]
        assert all(p.name.startswith(f"{split}-") and p.name.endswith(f"-of-{len(files):05d}") for p in files)
        for path in files:
            for _, _, payload in tfrecord.read_records(path):
                example = tfrecord.decode_example(payload)
                name = f"{folder}/{example['image/filename'][0].decode()}"
                assert example["image/class/label"][0] == truth[name] + 1, name  # 1-based
                assert example["image/encoded"][0] == (digits / name).read_bytes()
                seen.append(name)
    assert sorted(seen) == sorted(truth), "not every image was converted exactly once"
    # Our index files are what DALI's own tfrecord2idx makes of our records.
    shard = tfrecord.record_files(records / "train")[0]
    theirs = tmp_path / "theirs.idx"
    subprocess.run([str(Path(PYTHON).with_name("tfrecord2idx")), str(shard), str(theirs)], check=True, env=env())
    assert theirs.read_text() == (records / "idx_files" / "train" / shard.name).read_text()


def test_converter_resumes_and_verifies(digits, records, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(records, out)
    shards = tfrecord.record_files(out / "train")
    before = {p.name: p.read_bytes() for p in shards}
    # An interrupted run: one shard finished without its index, one truncated, one missing,
    # and a temporary file left behind.
    (out / "idx_files" / "train" / shards[0].name).unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-100])
    shards[2].unlink()
    (out / "train" / f".{shards[3].name}.tmp-123").write_bytes(b"partial")
    proc = convert(digits, out)
    total = len(shards) + len(tfrecord.record_files(out / "validation"))
    assert f"{total - 3} of {total} shards already finished" in proc.stderr
    assert not list(out.glob("train/.*")), "the temporary file was left behind"
    after = {p.name: p.read_bytes() for p in tfrecord.record_files(out / "train")}
    assert after == before, "the resumed conversion differs from the uninterrupted one"
    for p in tfrecord.record_files(out / "train"):
        assert not tfrecord.index_matches(p, out / "idx_files" / "train" / p.name)

    # Other settings into the same OUT are refused, not mixed in.
    assert "seed" in one_line_error(convert(digits, out, "--seed", "5", check=False))
    # Verification: a damaged record is named by the index tool, with exit 2.
    damaged = bytearray(shards[4].read_bytes())
    damaged[40] ^= 0xFF
    shards[4].write_bytes(bytes(damaged))
    assert str(shards[4]) in one_line_error(tool("index", out))


def test_converter_bad_input(digits, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(digits, src)
    assert "no such directory" in one_line_error(tool("convert", tmp_path / "nowhere", tmp_path / "o1"))
    broken = src / "train" / "3" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    assert str(broken) in one_line_error(convert(src, tmp_path / "o2", check=False))
    broken.unlink()
    (src / "val" / "extra_class").mkdir()
    shutil.copy(next((src / "val" / "1").glob("*.jpg")), src / "val" / "extra_class")
    assert "extra_class" in one_line_error(convert(src, tmp_path / "o3", check=False))
    assert "--shard-size" in one_line_error(tool("convert", src, tmp_path / "o4", "--shard-size", "0"))


def test_index_subcommand_for_existing_records(records, tmp_path):
    out = tmp_path / "theirs"
    shutil.copytree(records / "train", out / "train")
    shutil.copytree(records / "validation", out / "validation")
    proc = tool("index", out, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "validation"):
        for p in tfrecord.record_files(records / "idx_files" / split):
            assert (out / "idx_files" / split / p.name).read_text() == p.read_text()
    meta = json.loads((out / "idx_files" / "dataset.json").read_text())
    ours = json.loads((records / "idx_files" / "dataset.json").read_text())
    assert (meta["label_base"], meta["num_classes"]) == (ours["label_base"], ours["num_classes"])


# --- the DALI pipeline -------------------------------------------------------------------------


@pytest.mark.dali
@pytest.mark.parametrize("fmt", ["tfrecord", "folder"])
def test_dali_images_and_labels_match_torchvision(digits, records, fmt):
    """CPU pipeline: labels of known images equal ImageFolder's; validation images equal
    torchvision's val transform; a whole-image training crop equals it or its mirror image."""
    root = records if fmt == "tfrecord" else digits
    data = dali_input(root, fmt, "--crop-scale", "1,1", "--crop-ratio", "1,1")
    names = record_names(records) if fmt == "tfrecord" else {}
    labels = {p: y for split in ("train", "val") for p, y in datasets.ImageFolder(str(digits / split)).samples}
    transform = val_transform(data.cfg)
    assert data.num_classes == 10
    flipped = seen = 0
    for split, folder in (("validation", "val"), ("train", "train")):
        for images, batch_labels, ids in data.batches(split, with_ids=True):
            assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
            for image, label, sample in zip(images, batch_labels.tolist(), ids):
                path = str(digits / folder / names[sample]) if fmt == "tfrecord" else sample
                assert label == labels[path], f"{sample}: label {label}, ImageFolder says {labels[path]}"
                reference = transform(datasets.folder.default_loader(path))
                straight = (image - reference).abs().max().item()
                mirrored = (image - reference.flip(-1)).abs().max().item()
                assert min(straight, mirrored) < 0.05, f"{sample}: image differs from torchvision's"
                if split == "validation":
                    assert straight < 0.05, f"{sample}: validation image was flipped"
                else:
                    flipped += mirrored < straight
                seen += 1
    n_train = data.batches_per_epoch * data.cfg.schedule.batch_size
    assert 0 < flipped < n_train, "training images are never or always flipped"
    assert seen == n_train + len(datasets.ImageFolder(str(digits / "val")))


@pytest.mark.dali
def test_label_base_is_detected_or_refused(digits, records, tmp_path):
    # 0-based records: auto reads the base, labels equal the 1-based records' minus one.
    zero = tmp_path / "zero"
    convert(digits, zero, "--label-base", "0")
    one_based, zero_based = val_labels(records), val_labels(zero)
    assert one_based == zero_based and min(one_based.values()) == 0
    # A flag that contradicts the recorded base is refused.
    with pytest.raises(UsageError, match="labels start at 1"):
        dali_input(records, "tfrecord", "--label-offset", "0")
    # Without dataset.json, auto refuses; a wrong explicit offset stops at the first bad label.
    bare = tmp_path / "bare"
    shutil.copytree(records, bare)
    (bare / "idx_files" / "dataset.json").unlink()
    with pytest.raises(UsageError, match="label base is unknown"):
        dali_input(bare, "tfrecord")
    right = dali_input(bare, "tfrecord", "--label-offset", "1", "--num-classes", "10")
    assert sum(len(y) for _, y in right.val()) == len(one_based)
    wrong = dali_input(bare, "tfrecord", "--label-offset", "0", "--num-classes", "10")
    with pytest.raises(UsageError, match="label 10 in .* outside 0..9"):
        for _ in wrong.val():
            pass


@pytest.mark.dali
@pytest.mark.mpi
def test_each_sample_once_per_epoch_on_two_ranks(digits_odd, tmp_path, engine):
    """Uneven data (223 training, 77 validation images) on 2 ranks, both formats."""
    records = tmp_path / "records"
    convert(digits_odd, records)
    proc = run_mpi_script(SCRIPTS / "dali_shards.py", [records, digits_odd], engine=engine)
    summary = results(proc.stdout)
    assert sorted(s["rank"] for s in summary if s.get("check") == "shards") == [0, 1]
    assert [s["format"] for s in summary if "format" in s] == ["tfrecord", "folder"]


@pytest.mark.dali
def test_corrupt_images_are_named(digits, records, tmp_path):
    # A folder with a file that is not an image.
    folder = tmp_path / "folder"
    shutil.copytree(digits, folder)
    broken = folder / "train" / "3" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    data = dali_input(folder, "folder")
    with pytest.raises(UsageError, match=re.escape(f"unreadable image in {broken}: DALI cannot decode it")):
        for epoch in range(3):  # the bad file sits out an epoch only if it is in the remainder
            list(data.train(epoch))
    assert str(broken) in data.bad_files
    # A TFRecord whose 8th record holds garbage instead of a JPEG (made by hand: the converter
    # refuses such input), through the job, which must exit 2 with one line naming it.
    bad = tmp_path / "records"
    shutil.copytree(records, bad)
    shard = tfrecord.record_files(bad / "train")[3]
    found = list(tfrecord.read_records(shard))
    payloads = [p for _, _, p in found]
    example = tfrecord.decode_example(payloads[7])
    payloads[7] = tfrecord.encode_example({tfrecord.ENCODED: b"garbage", tfrecord.LABEL: example[tfrecord.LABEL][0]})
    shard.write_bytes(b"".join(tfrecord.frame(p) for p in payloads))
    tfrecord.index_file((shard, bad / "idx_files" / "train" / shard.name))
    proc = run_job(
        ["--data-dir", bad, *FAST, "--dali-device", "cpu", "--log-dir", tmp_path / "run", "--epochs", "1"],
        np=1,
        script=TRAIN_DALI,
        check=False,
    )
    line = one_line_error(proc)
    assert f"unreadable image in {shard}, the record at byte {found[7][0]}" in line, line


@pytest.mark.dali
def test_gpu_pipeline_without_gpu_is_a_one_line_error(records, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_job(
        ["--data-dir", records, *FAST, "--dali-device", "gpu", "--log-dir", tmp_path / "run"],
        np=1,
        script=TRAIN_DALI,
        check=False,
    )
    assert "--dali-device gpu needs a GPU" in one_line_error(proc)


# --- the training job ---------------------------------------------------------------------------


@pytest.mark.dali
@pytest.mark.mpi
def test_dali_job_trains_resumes_and_logs_like_torchvision(straight_runs, digits, records, tmp_path):
    """Two ranks, TFRecords, CPU pipeline: stopped mid-epoch by SIGUSR1, resumed with
    --resume auto, and the result equals an uninterrupted run (the resumed epoch replays
    its first batches); TensorBoard tags are the torchvision job's (the shared LARS run of
    the same flags on the digits' folders, conftest.py)."""
    common = [*FAST, "--dali-device", "cpu", "--dali-threads", "1", "--epochs", "2", "--seed", "7"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    torchvision_run = straight_runs("horovod").run_dir
    run_job(["--data-dir", records, *common, "--log-dir", straight], script=TRAIN_DALI)

    args = ["--data-dir", records, *common, "--log-dir", interrupted]
    output = run_and_signal(args, when="epoch 2/2 step 3/", marker=str(interrupted), script=TRAIN_DALI)
    status = json.loads((interrupted / "status.json").read_text())
    assert status["state"] == "stopped", output
    steps_per_epoch = (len(datasets.ImageFolder(str(digits / "train"))) // 2) // 16
    assert steps_per_epoch + 3 <= status["step"] < 2 * steps_per_epoch

    resumed = run_job(args, script=TRAIN_DALI)
    assert "resuming from" in resumed.stdout
    assert json.loads((interrupted / "status.json").read_text())["state"] == "finished"
    a, b = latest_checkpoint(straight), latest_checkpoint(interrupted)
    assert a["step"] == b["step"] == 2 * steps_per_epoch
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after interrupt + resume"

    assert set(read_scalars(interrupted)) == set(read_scalars(torchvision_run))
    val_steps = [step for step, _ in read_scalars(interrupted)["val/top1"]]
    assert val_steps == [steps_per_epoch, 2 * steps_per_epoch]
