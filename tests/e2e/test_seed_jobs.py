"""The older projects' command lines, run for real: an Apex line under torchrun (then the
same line validating the checkpoint with -e), a LARS-trainer line under mpirun, and the
TorchShard-style example script under torchrun. Lines are as their READMEs print them;
test flags (data, epochs, image size, batch) are appended."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from helpers import MODEL, PYTHON, ROOT, TRAIN, env, latest_checkpoint, results, run_in_process, run_job

pytestmark = pytest.mark.mpi
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone"]
APEX = "-a resnet50 --b 128 --workers 4 --opt-level O0 ./"  # 001's "pure FP32" line (O1/O2 need a GPU)
# The test's own: data, length, size, and the tests' small MODEL instead of resnet18 (the lines
# are what is checked here, not what the model learns).
SHORT = f"-a {MODEL} --b 16 --workers 0 --epochs 1 --image-size 16 --val-resize 16 --no-cuda --print-freq 1"


def launch(cmd: list, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env(), cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def evaluated(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("evaluated"))


def test_apex_line_under_torchrun_then_evaluate(digits, tmp_path):
    run = tmp_path / "run"
    argv = [*shlex.split(APEX), *shlex.split(SHORT), "--log-dir", run]
    proc = launch([*TORCHRUN, "--nproc_per_node", "2", TRAIN, *argv], cwd=digits)  # ./ is the data root
    assert "torch engine" in proc.stdout
    saved = latest_checkpoint(run)
    args = saved["args"]
    assert (args["train_dir"], args["model"], args["base_op"], args["lr_schedule"]) == ("train", MODEL, "sgd", "step")
    assert args["base_lr"] == pytest.approx(0.1 * 16 / 256) and args["lr_scaling"] == "linear"
    assert saved["world_size"] == 2 and saved["epoch"] == 1

    # -e on the same line: validates the checkpoint, on 2 processes and on 1, with the same
    # numbers (each image once), and leaves the run directory as it was
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    ckpt = run / sorted(p.name for p in run.glob("checkpoint-*"))[-1]
    two = evaluated(
        launch([*TORCHRUN, "--nproc_per_node", "2", TRAIN, *argv, "-e", "--resume", ckpt], cwd=digits).stdout
    )
    one = evaluated(launch([PYTHON, TRAIN, *argv, "--evaluate"], cwd=digits).stdout)  # the newest in --log-dir
    assert "(80 images)" in two and "2 process(es)" in two and "1 process(es)" in one
    assert two.split("val loss")[1] == one.split("val loss")[1], (two, one)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_evaluate_without_a_checkpoint_is_one_line(digits, tmp_path):
    proc = run_in_process([digits, *shlex.split(SHORT), "-e", "--log-dir", tmp_path / "empty"])
    assert proc.returncode == 2 and "no checkpoint in --log-dir" in proc.stderr and "Traceback" not in proc.stderr


def test_lars_readme_line_under_mpirun(digits, tmp_path):
    line = (
        f"--batch-size 128 --warmup-epochs 0.3125 --train-dir={digits}/train/ --val-dir={digits}/val "
        f"--base-lr 5.6568542494924 --base-op lars --bn-bias-separately --wd 0.0001 --lr-scaling keep"
    )
    extra = [
        "--lr-decay",
        "30",
        "60",
        "80",
        "--single-threaded",  # the original's other flags
        "--model",
        MODEL,
        "--batch-size",
        "16",
        "--val-batch-size",
        "32",
        "--epochs",
        "1",
        "--image-size",
        "16",
        "--val-resize",
        "16",
        "--print-freq",
        "1",
        "--log-dir",
        tmp_path / "run",
    ]
    run_job([*shlex.split(line), *extra], np=2)
    args = latest_checkpoint(tmp_path / "run")["args"]
    assert (args["base_op"], args["bn_bias_separately"], args["label_smoothing"], args["lr_power"]) == (
        "lars",
        True,
        0.1,
        2.0,
    )
    assert (args["workers"], args["lr_decay_epochs"], args["wd"]) == (0, [30.0, 60.0, 80.0], 1e-4)


def test_torchshard_style_example(tmp_path):
    proc = launch([*TORCHRUN, "--nproc_per_node", "2", ROOT / "docs/examples/torchshard_style.py", tmp_path], cwd=ROOT)
    reports = results(proc.stdout.replace("}{", "}\n{"))
    assert len(reports) == 2 and all(r["same_model"] and r["same_momentum"] for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"]  # the loss is the global batch's, on every rank
    assert all(r["slice"] == [5, 16] for r in reports)
