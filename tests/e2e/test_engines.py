"""The two engines side by side: the same training from the same seed, a run moved from one
to the other, auto-selection, torchrun (single- and multi-node rendezvous), and the torch
engine on a machine where Horovod cannot be imported."""

from __future__ import annotations

import socket
import subprocess

import pytest
from test_bad_input import assert_usage_error

from helpers import (
    MODEL,
    PYTHON,
    ROOT,
    TRAIN,
    env,
    job_args,
    latest_checkpoint,
    mpi_command,
    run_and_signal,
    run_in_process,
    run_job,
)

pytestmark = pytest.mark.mpi
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


def torchrun(
    args: list, nproc: int = 2, launcher: list | None = None, timeout: float = 300, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)]), TRAIN, *map(str, args)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **(extra_env or {})}, cwd=ROOT
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_same_seed_same_weights_on_both_engines(straight_runs):
    """Two processes, two epochs of LARS from the same seed, under each engine (conftest.py's
    straight_runs). The engines sum in different orders ((a + b) / 2 against a / 2 + b / 2),
    which two processes make exact (halving is exact; measured: identical weights) but more
    need not, so the bound allows float rounding after 20 steps."""
    runs = {name: straight_runs(name) for name in ("horovod", "torch")}
    assert "2 process(es), horovod engine" in runs["horovod"].stdout
    assert "2 process(es), torch engine" in runs["torch"].stdout
    hvd, tch = latest_checkpoint(runs["horovod"].run_dir), latest_checkpoint(runs["torch"].run_dir)
    assert (hvd["engine"], tch["engine"]) == ("horovod", "torch")
    difference = max_difference(hvd["model"], tch["model"])
    print(f"largest weight difference between the engines: {difference:.3e}")
    assert difference < 1e-4


def test_horovod_run_resumes_under_torchrun(straight_runs, digits, tmp_path):
    """Stopped after its first epoch under Horovod, continued under torchrun: it ends where
    the uninterrupted Horovod run (conftest.py's straight_runs) ends (to float rounding: the
    second epoch's sums are the torch engine's)."""
    reference = straight_runs("horovod")
    moved = job_args(digits, tmp_path / "moved", *reference.flags)
    run_and_signal([*moved, "--engine", "horovod"], when="epoch 1/2: val", marker=str(tmp_path / "moved"))
    stopped = latest_checkpoint(tmp_path / "moved")
    assert (stopped["engine"], stopped["epoch"]) == ("horovod", 1)
    proc = torchrun(moved)
    assert "resuming from" in proc.stdout and "torch engine" in proc.stdout
    straight, resumed = latest_checkpoint(reference.run_dir), latest_checkpoint(tmp_path / "moved")
    assert (resumed["engine"], resumed["step"]) == ("torch", straight["step"])
    assert max_difference(straight["model"], resumed["model"]) < 1e-4


def test_torchrun_multi_node_rendezvous(digits, tmp_path):
    """Two "nodes" (two torchrun agents on this host) meeting through the c10d rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = job_args(digits, tmp_path / "run", "--epochs", "1")
    agents = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "test",
                TRAIN,
                *map(str, args),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert any("2 process(es), torch engine" in o for o in outputs)
    assert latest_checkpoint(tmp_path / "run")["world_size"] == 2


def test_torch_engine_never_imports_horovod(digits, tmp_path):
    """A `horovod` package that kills any process importing it: the torch engine runs on.
    And one whose import fails: --engine auto falls back to torch, saying so in one line."""
    poisoned, missing = tmp_path / "poisoned", tmp_path / "missing"
    for root, body in ((poisoned, "import os\nos._exit(17)\n"), (missing, "raise ImportError('no Horovod here')\n")):
        (root / "horovod").mkdir(parents=True)
        (root / "horovod" / "__init__.py").write_text(body)
    args = ["--epochs", "1"]
    cmd = mpi_command(2, TRAIN, [*job_args(digits, tmp_path / "torch", *args, "--engine", "torch")])
    shadow = {"PYTHONPATH": str(poisoned)}  # a fake horovod in front of the installed one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env(), **shadow}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cmd = mpi_command(2, TRAIN, [*job_args(digits, tmp_path / "auto", *args)])
    shadow = {"PYTHONPATH": str(missing)}  # a fake horovod in front of the installed one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env(), **shadow}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("using the torch engine") == 1, proc.stdout
    assert latest_checkpoint(tmp_path / "auto")["engine"] == "torch"


@pytest.mark.parametrize(
    "engine_name, flags, fragment",
    [
        ("torch", ["--use-adasum"], "--use-adasum needs the Horovod engine"),
        ("torch", ["--prof", "2", "--timeline"], "--timeline needs the Horovod engine"),
        ("horovod", ["--bf16-allreduce"], "--bf16-allreduce needs the torch engine"),
    ],
)
def test_flags_of_one_engine_are_refused_under_the_other(engine_name, flags, fragment, tmp_path):
    """Under Horovod: a real 2-rank job. The torch engine's refusals come from the same check
    (job.start_engine) on a one-process group, in the test's process."""
    args = [
        "--synthetic",
        "--synthetic-size",
        "64",
        "--model",
        MODEL,
        "--image-size",
        "16",
        "--val-resize",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--engine",
        engine_name,
        "--log-dir",
        tmp_path / "run",
        *flags,
    ]
    if engine_name == "horovod":
        proc = run_job(args, np=2, check=False, timeout=120)
    else:
        proc = run_in_process(args)
    assert_usage_error(proc, fragment)


def test_compressed_and_predivided_gradients_are_the_average(engine_checks, engine):
    """--fp16-allreduce, --bf16-allreduce (torch engine) and --gradient-predivide-factor,
    against the exact average of both ranks' gradients: uncompressed, to fp32 rounding;
    compressed, within the dtype's rounding and not exact (the values did travel narrowed)."""
    bound = {"none": 1e-6, "fp16": 2**-10, "bf16": 2**-7}  # twice each type's unit roundoff
    reports = engine_checks(engine, "compression")
    expected = {"none", "fp16", "bf16"} if engine == "torch" else {"none", "fp16"}
    assert {r["compression"] for r in reports} == expected and len(reports) == 2 * 2 * len(expected), reports
    for r in reports:
        assert r["error"] <= bound[r["compression"]], r
        assert r["compression"] == "none" or r["error"] > 0, r


def test_torchrun_selects_the_torch_engine_and_python_m_launch_works(digits, tmp_path):
    """torchrun chooses the torch engine by itself; so does `python -m torch.distributed.launch`,
    whose --local-rank argument the job accepts."""
    proc = torchrun(job_args(digits, tmp_path / "run", "--epochs", "1"))
    assert "2 process(es), torch engine" in proc.stdout
    assert latest_checkpoint(tmp_path / "run")["engine"] == "torch"
    # The deprecated launcher passes --local-rank to the script (without --use-env).
    launch = [PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launch, TRAIN, *map(str, job_args(digits, tmp_path / "launch", "--epochs", "1"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 process(es), torch engine" in proc.stdout
