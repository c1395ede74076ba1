"""The model-parallel classifier (--enable-model-parallel) in real mpirun jobs: exact
gradients against the dense model, the parallel cross-entropy against torch's, validation
against a dense evaluation, and dense checkpoints that re-shard over 1 and 3 processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_bad_input import assert_usage_error
from test_training import val_lines
from torchvision import datasets

from helpers import (
    MODEL,
    job_args,
    latest_checkpoint,
    load_checkpoint,
    results,
    run_in_process,
    run_job,
    run_mpi_script,
)
from largebatch.config import parse_config
from largebatch.data.folder import val_transform
from largebatch.metrics import topk_hits
from largebatch.model import build_model

# Every test starts mpirun jobs (some through the two_process_run fixture).
pytestmark = pytest.mark.mpi

SCRIPTS = Path(__file__).parent / "scripts"
SMOOTHING = 0.1
# 77 validation images over 2 ranks are 39 + 38: with batches of 38, rank 0 has one batch
# more than rank 1, which has to keep step with an empty one.
MP = ["--enable-model-parallel", "--base-op", "lars", "--label-smoothing", str(SMOOTHING), "--val-batch-size", "38"]
# Over 3 ranks 26 + 26 + 25: with batches of 25, rank 2 runs out first.
VAL_3 = ["--val-batch-size", "25"]


@pytest.mark.parametrize("dim", [1, 0])
def test_sharded_steps_equal_dense_steps(engine_checks, dim, engine):
    cases = {r["case"]: r for r in engine_checks(engine, "parallel_step", str(dim))}  # rank 0 reports each case
    assert len(cases) == 6, cases  # SGD, LARS, LAMB x 10 and 7 classes
    assert all(r["moved"] > 1e-3 and r["difference"] < r["tolerance"] for r in cases.values()), cases


def test_parallel_cross_entropy_matches_torch(engine):
    proc = run_mpi_script(SCRIPTS / "parallel_loss.py", np=3, engine=engine)
    reports = results(proc.stdout)
    losses = [r for r in reports if r["check"] == "loss"]
    assert len(losses) == 3 * 8  # 3 ranks x 2 class counts x smoothing x ignore_index
    assert all(r["loss"] == pytest.approx(r["torch"], rel=1e-5, abs=1e-6) for r in losses), losses
    assert sorted((r["rank"], r["dim"]) for r in reports if r["check"] == "layer") == [
        (r, d) for r in range(3) for d in (0, 1)
    ]


def dense_evaluation(data: Path, state: dict) -> dict:
    """Loss, top-1 and top-5 of the checkpoint's weights on every validation image, one
    process, a plain torchvision model: what the sharded job's validation must report."""
    model = build_model(MODEL, state["model"]["fc.weight"].shape[0])
    model.load_state_dict(state["model"])
    model.eval()
    cfg = parse_config(
        ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"), "--image-size", "16", "--val-resize", "16"]
    )
    dataset = datasets.ImageFolder(str(data / "val"), transform=val_transform(cfg))
    images = torch.stack([image for image, _ in dataset])
    labels = torch.tensor([label for _, label in dataset])
    with torch.no_grad():
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=SMOOTHING).item()
    top1, top5 = (100 * h.item() / len(dataset) for h in topk_hits(logits, labels))
    return {"loss": loss, "top1": top1, "top5": top5, "count": len(dataset)}


def assert_validation_is_dense(stdout: str, data: Path, state: dict) -> None:
    """Only for a one-process run: batch norm statistics are each rank's own (rank 0's are
    saved), so a multi-rank run validates with statistics the checkpoint does not hold."""
    reported, expected = val_lines(stdout)[-1], dense_evaluation(data, state)
    assert reported["count"] == expected["count"]
    for key in ("top1", "top5"):
        assert reported[key] == pytest.approx(expected[key], abs=0.006), key
    assert reported["loss"] == pytest.approx(expected["loss"], rel=1e-3, abs=1e-4)


@pytest.fixture(scope="module")
def two_process_run(digits_odd, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("model_parallel") / "run"
    proc = run_job(job_args(digits_odd, run_dir, "--epochs", "2", *MP))
    return run_dir, proc


def test_job_saves_a_dense_classifier(two_process_run):
    run_dir, proc = two_process_run
    state = latest_checkpoint(run_dir)
    dense = build_model(MODEL, 10).state_dict()
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in dense.items()}
    # LARS's groups hold the weights (ndim > 1) first, then biases and norms: the optimizer's numbering.
    named = list(build_model(MODEL, 10).named_parameters())
    order = [n for n, p in named if p.ndim > 1] + [n for n, p in named if p.ndim <= 1]
    for name in ("fc.weight", "fc.bias"):
        momentum = state["optimizer"]["state"][order.index(name)]["momentum_buffer"]
        assert momentum.shape == dense[name].shape and momentum.abs().sum() > 0, f"{name}'s momentum is not dense"
    reported = val_lines(proc.stdout)
    assert [v["count"] for v in reported] == [77, 77] and all(v["loss"] < 10 for v in reported)


def evaluated(stdout: str) -> dict:
    import re

    m = re.search(r"val loss ([\d.]+) top1 ([\d.]+) top5 ([\d.]+) \((\d+) images\)", stdout)
    assert m, stdout[-2000:]
    return dict(loss=float(m[1]), top1=float(m[2]), top5=float(m[3]), count=int(m[4]))


def test_a_dense_checkpoint_trains_on_only_its_own_process_count(two_process_run, digits_odd, tmp_path):
    """A 2-process checkpoint: training it on 1 process is refused (its schedule and data
    order are 2 processes'), and only its weights are read by --evaluate on 1 process (equal
    to a dense evaluation) and on 3, re-sharded over the torch engine's collectives."""
    run_dir, _ = two_process_run
    saved = run_dir / "checkpoint-1.pth.tar"
    proc = run_in_process(job_args(digits_odd, tmp_path / "run", "--epochs", "2", *MP, "--resume", saved))
    assert_usage_error(proc, f"{saved} was written by 2 processes", "this run has 1")
    assert not (tmp_path / "run" / "checkpoint-2.pth.tar").exists()

    one = evaluated(
        run_job(
            job_args(digits_odd, tmp_path / "unused", "--epochs", "2", *MP, "--resume", saved, "--evaluate"), np=1
        ).stdout
    )
    expected = dense_evaluation(digits_odd, load_checkpoint(saved))
    assert one["count"] == expected["count"] == 77
    assert one["top1"] == pytest.approx(expected["top1"], abs=0.006)
    assert one["loss"] == pytest.approx(expected["loss"], rel=1e-3, abs=1e-4)
    three = evaluated(
        run_job(
            job_args(
                digits_odd,
                tmp_path / "unused",
                "--epochs",
                "2",
                *MP,
                "--resume",
                saved,
                "--evaluate",
                "--model-parallel-dim",
                "0",
                *VAL_3,
                "--engine",
                "torch",
            ),
            np=3,
        ).stdout
    )
    assert three["count"] == 77 and three["top1"] == pytest.approx(one["top1"], abs=0.006)


def test_each_rank_loads_its_slice_and_saves_the_same_dense_state(two_process_run, digits_odd, tmp_path, engine):
    run_dir, _ = two_process_run
    flags = job_args(digits_odd, tmp_path / "unused", "--epochs", "2", *MP, *VAL_3)
    proc = run_mpi_script(
        SCRIPTS / "parallel_checkpoint.py", [run_dir / "checkpoint-2.pth.tar", tmp_path, *flags], np=3, engine=engine
    )
    reports = results(proc.stdout)
    assert sorted((r["rank"], r["dim"]) for r in reports if r["round_trip"]) == [
        (r, d) for r in range(3) for d in (0, 1)
    ]
    assert all(r["sharded"]["count"] == 77 and r["sharded"]["top1"] == r["dense"]["top1"] for r in reports), reports


def test_models_that_cannot_be_split_are_refused(tmp_path):
    proc = run_in_process(
        [
            "--synthetic",
            "--model",
            "squeezenet1_0",
            "--enable-model-parallel",
            "--log-dir",
            tmp_path / "a",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
        ]
    )
    assert_usage_error(proc, "--enable-model-parallel", "nn.Linear")
    proc = run_job(
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--num-classes",
            "1",
            "--enable-model-parallel",
            "--image-size",
            "16",
            "--val-resize",
            "16",
            "--log-dir",
            tmp_path / "b",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
        ],
        np=2,
        check=False,
        timeout=120,
    )
    assert_usage_error(proc, "1 classes over 2 processes")
