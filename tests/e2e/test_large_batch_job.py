"""The large-batch techniques of issue 19 in real 2-process jobs on both engines: zero-init
residuals, Nesterov LARS, ghost batch norm, PreciseBN, an EMA of the weights and an evaluation
cadence together, stopped and resumed, end bit for bit where the uninterrupted run ends;
--target-top1 ends the run at the first validation that reaches it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import job_args, latest_checkpoint, run_and_signal, run_in_process, run_job

pytestmark = pytest.mark.mpi

# cifar_resnet8 has residual blocks (zero-init needs them); batches of 16 in ghost batches of 8;
# 3 epochs of 10 steps, validated after epochs 2 and 3, each time after re-estimating batch norm
# over 64 training images, beside an average of the weights (updated every 2 steps).
ALL = (
    *("--model", "cifar_resnet8", "--zero-init-residual", "--nesterov", "--ghost-bn", "8", "--precise-bn", "64"),
    *("--model-ema", "0.99", "--model-ema-steps", "2", "--eval-every", "2", "--epochs", "3", "--seed", "7"),
    *("--checkpoint-every", "5"),
)


def validations(stdout: str) -> dict[int, float]:
    return {int(e): float(t) for e, t in re.findall(r"epoch (\d+)/\d+: val loss [\d.]+ top1 ([\d.]+)", stdout)}


def ema_validations(stdout: str) -> dict[int, float]:
    pattern = r"epoch (\d+)/\d+: val .*; EMA val loss [\d.]+ top1 ([\d.]+)"
    return {int(e): float(t) for e, t in re.findall(pattern, stdout)}


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    """The uninterrupted run of ALL on each engine, with what it printed."""
    made = {}

    def get(engine: str):
        if engine not in made:
            run_dir = tmp_path_factory.mktemp(f"all_{engine}") / "run"
            proc = run_job(job_args(digits, run_dir, *ALL, "--engine", engine))
            made[engine] = run_dir, proc.stdout
        return made[engine]

    return get


def test_all_techniques_stopped_and_resumed_equal_the_uninterrupted_run(straight, digits, tmp_path, engine):
    reference, stdout = straight(engine)
    assert sorted(validations(stdout)) == [2, 3]
    assert "epoch 1/3: checkpoint written (validated every --eval-every epochs)" in stdout
    assert len(re.findall(r"batch norm re-estimated over 64 images in [\d.]+ s", stdout)) == 2, stdout[-3000:]
    interrupted = tmp_path / "run"
    args = job_args(digits, interrupted, *ALL, "--engine", engine)
    run_and_signal(args, when="epoch 1/3 step 4/", marker=str(interrupted))
    resumed = run_job(args)
    assert "resuming from" in resumed.stdout
    assert validations(resumed.stdout) == validations(stdout)
    assert sorted(ema_validations(stdout)) == [2, 3] and ema_validations(resumed.stdout) == ema_validations(stdout)
    a, b = latest_checkpoint(reference), latest_checkpoint(interrupted)
    assert a["step"] == b["step"] == 30
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after interrupt + resume"
        assert torch.equal(a["ema"][name], b["ema"][name]), f"the average's {name} differs after interrupt + resume"
    for pid, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])


def test_target_top1_ends_the_run_at_the_first_validation_that_reaches_it(straight, digits, tmp_path, engine):
    _, stdout = straight(engine)
    target = validations(stdout)[2]  # the first validation's top-1: the run must end there
    run_dir = tmp_path / "run"
    proc = run_job(job_args(digits, run_dir, *ALL, "--engine", engine, "--target-top1", f"{target:.2f}"))
    assert re.search(
        rf"reached --target-top1 {target:g}: top1 {target:.2f} at epoch 2, after [\d.]+ s of training", proc.stdout
    ), proc.stdout[-2000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["epoch"], status["target"]["epoch"]) == ("finished", 2, 2)
    assert status["target"]["seconds"] > 0
    assert latest_checkpoint(run_dir)["reached"]["top1"] == pytest.approx(target)
    assert "epoch 3/3" not in proc.stdout
    again = run_in_process(job_args(digits, run_dir, *ALL, "--target-top1", f"{target:.2f}"))
    assert again.returncode == 0 and "reached --target-top1 at epoch 2" in again.stdout, again.stdout[-2000:]


def test_evaluate_ema_validates_the_average_the_run_validated(straight, digits):
    """--evaluate --evaluate-ema of the last checkpoint, on one process: the average's top-1 as
    the 2-process run reported it after its last epoch (each image once, its statistics saved)."""
    reference, stdout = straight("torch")
    proc = run_in_process(job_args(digits, reference, *ALL, "--evaluate", "--evaluate-ema"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluated the weights' average of" in proc.stdout
    top1 = float(re.search(r"val loss [\d.]+ top1 ([\d.]+)", proc.stdout)[1])
    assert top1 == pytest.approx(ema_validations(stdout)[3], abs=0.006)


def test_the_average_of_a_sharded_classifier_is_saved_whole(digits, tmp_path):
    run_dir = tmp_path / "run"
    run_job(
        job_args(
            digits, run_dir, "--epochs", "1", "--model-ema", "0.99", "--enable-model-parallel", "--engine", "torch"
        )
    )
    state = latest_checkpoint(run_dir)
    assert {k: v.shape for k, v in state["ema"].items()} == {k: v.shape for k, v in state["model"].items()}
    assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    proc = run_in_process(
        job_args(
            digits,
            tmp_path / "other",
            "--epochs",
            "1",
            "--evaluate",
            "--evaluate-ema",
            "--resume",
            run_dir / "checkpoint-1.pth.tar",
        )
    )
    assert proc.returncode == 0 and "(80 images)" in proc.stdout, proc.stderr[-2000:]
